"""The synthetic catalogue a run without --manifest uses, stored once per settings and reused: what the
flow's `start` step calls (this module, unlike gallery.steps, imports no torch, so `start` starts fast)."""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict

import gallery.storage as storage
from gallery.faults import reached
from gallery.data.synth import VERSION as SYNTH_VERSION
from gallery.data.synth import generate

CATALOGUE_COMPLETE = "COMPLETE"  # written after every other file of a stored synthetic catalogue


def synthetic_source(store_root: str, settings, log=print) -> tuple[str, str]:
    """The preset's synthetic catalogue, generated once per (settings, seed) and reused after.

    Only a catalogue with its completion marker is reused: a start step that crashed while writing or
    uploading one (images missing, manifest present) leaves none, and the next run generates it again.
    """
    synth = settings.data.synth
    key = hashlib.sha1(json.dumps({"version": SYNTH_VERSION, **asdict(synth)}, sort_keys=True).encode()).hexdigest()[:12]
    location = storage.join(store_root, "catalogues", f"synth-{key}")
    manifest, tasks = storage.join(location, "manifest.parquet"), storage.join(location, "tasks.yaml")
    complete = storage.join(location, CATALOGUE_COMPLETE)
    if storage.exists(complete):
        log(f"reusing the synthetic catalogue at {location}")
        return manifest, tasks
    log(f"generating the synthetic catalogue ({synth.galleries} galleries, {synth.image_size}px) at {location}")
    if storage.is_uri(location):
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp, synth)
            storage.upload_dir(tmp, location)
    else:
        generate(location, synth)
    reached("synth.generated")
    storage.write_bytes(complete, json.dumps(asdict(synth)).encode())
    return manifest, tasks


