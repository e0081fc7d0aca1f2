"""SIE's test suite. pytest imports this package before any test module: it clears the caller's mode variables."""

import os

# The suite does not depend on the caller's environment: the variables that choose a mode (offline or not, which hub,
# every server setting) are cleared, then set as the tests need them. huggingface_hub reads TRANSFORMERS_OFFLINE as
# HF_HUB_OFFLINE, so a test that goes online (the loopback hub) unsets both. The suite's own controls stay.
_TEST_CONTROLS = ("SIE_TEST_", "SIE_CONTAINER_TESTS", "SIE_IMAGE", "SIE_TORCH")
for _name in list(os.environ):
    if (_name.startswith("SIE_") and not _name.startswith(_TEST_CONTROLS)) or _name in (
            "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"):
        del os.environ[_name]
os.environ["HF_HUB_OFFLINE"] = "1"
