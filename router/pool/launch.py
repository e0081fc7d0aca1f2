"""What a model's worker is started with (router process): its weights folder, its family options and its
`WorkerSpec`. Functions of the settings and the model's config only, so the loader decides when and where, and this
module alone decides what the worker process is told."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

from sie_router.errors import LoadError
from sie_router.models.config import ModelConfig
from sie_router.models.weights import WeightsNotFound, WeightsQuery, resolve_weights
from sie_router.pool.devices import Devices, available_cpus, worker_env
from sie_router.settings import Settings
from sie_worker.options import FamilyOptions
from sie_worker.protocol import LoadErrorClass, WorkerSpec

log = logging.getLogger("sie.pool")


async def find_weights(settings: Settings, cfg: ModelConfig) -> tuple[str, str]:
    """The model's weights folder and where it came from ("", "none" for a model packaged with its adapter);
    LoadError NETWORK (transient, retried after the cooldown) or NOT_FOUND (permanent) when there are none."""
    if cfg.package_backed:
        return "", "none"
    query = WeightsQuery(model_id=cfg.sie_id, hf_id=cfg.hf_id, weights_path=cfg.weights_path,
                         package_dir=cfg.package_dir, revision=cfg.hf_revision)
    try:
        folder, origin = await asyncio.to_thread(resolve_weights, query, offline=settings.hf_offline)
    except WeightsNotFound as exc:
        log.error("cannot load %s: %s", cfg.sie_id, exc)
        retry = exc.transient or exc.unreachable
        raise LoadError(LoadErrorClass.NETWORK if retry else LoadErrorClass.NOT_FOUND, str(exc)) from None
    return str(folder), origin


def family_options(settings: Settings, cfg: ModelConfig) -> FamilyOptions | None:
    """The default profile's options, over the server's engine, lanes and image limits; None for a family
    without options of its own (its worker then fails to load, naming the family)."""
    server = {"engine": settings.engine, "onnx_lanes": settings.onnx_lanes,
              "max_image_pixels": settings.max_image_pixels, "max_image_bytes": settings.max_image_bytes}
    try:
        options = cfg.options(server=server)
    except ValueError as exc:  # a server setting the family's Struct refuses
        raise LoadError(LoadErrorClass.CONFIG, f"model '{cfg.sie_id}': {exc}") from None
    return options if isinstance(options, FamilyOptions) else None


def worker_spec(settings: Settings, devices: Devices, endpoints: tuple[str, str], cfg: ModelConfig, folder: str,
                device: str, options: FamilyOptions | None) -> WorkerSpec:
    """The spec a new worker for `cfg` on `device` reads from its stdin; `endpoints` are the supervisor's two
    router sockets (to the worker, from the worker)."""
    profile = cfg.profiles["default"]
    to_worker, from_worker = endpoints
    # One GPU (or MIG slice) per worker, named by UUID: the child sees only its own, as cuda:0.
    visible = devices.cuda_visible(device)
    return WorkerSpec(
        worker_id=uuid.uuid4().hex[:12], model=cfg.sie_id, adapter=cfg.family(), weights_dir=folder,
        to_worker_endpoint=to_worker, from_worker_endpoint=from_worker,
        device=device,
        compute_precision=profile.compute_precision if settings.dtype == "auto" else settings.dtype,
        max_sequence_length=cfg.max_sequence_length,
        options=options,
        threads=settings.worker_threads or available_cpus(),
        env={**worker_env(device, os.environ), **settings.extra_env,
             "CUDA_VISIBLE_DEVICES": visible},
        cpu_fallback=settings.device == "auto",  # a torch without CUDA then runs the worker on the CPU
        trust_remote_code=settings.trust_remote_code,
        max_batch_tokens=cfg.max_batch_tokens(gpu=device != "cpu"), log_format=settings.log_format,
        otlp_endpoint=settings.otlp_endpoint, otlp_service_name=settings.otlp_service_name)
