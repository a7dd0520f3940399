"""What makes a local run portable and a stored run safe to reuse: core counting without Linux's CPU
affinity (macOS), the device order CUDA -> MPS -> CPU, sharing cores only where tasks share a machine,
a synthetic catalogue reused only when complete, and the resources section of the presets."""
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import gallery.data.synth.stored as stored
from gallery.config import DataSettings, Settings, load_settings, settings_from_dict, settings_json
from gallery.data.synth import SynthSettings
from gallery.runs import share_machine
from gallery.training.device import DEVICE_ENV, available_cores, pick_device, share_cores


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cores_are_counted_without_cpu_affinity(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS
    assert available_cores() == 8 and share_cores(2) == 4 and torch.get_num_threads() == 4


def test_device_order_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == torch.device("mps")
    assert pick_device(distributed=True) == torch.device("cpu")  # gloo cannot all-reduce MPS tensors
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert pick_device() == torch.device("cpu")
    monkeypatch.delenv(DEVICE_ENV)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device(node=3) == torch.device("cuda", 1)


def test_cores_are_shared_only_where_the_tasks_share_this_machine(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(4)), raising=False)
    monkeypatch.setenv("METAFLOW_RUNTIME_ENVIRONMENT", "kubernetes")  # set by Metaflow in a remote task
    share_machine(2)
    assert torch.get_num_threads() == 1
    monkeypatch.delenv("METAFLOW_RUNTIME_ENVIRONMENT")
    share_machine(2)
    assert torch.get_num_threads() == 2


def tiny_synthetic(seed=0) -> Settings:
    synth = SynthSettings(galleries=6, seed=seed, image_size=16, min_images=1, max_images=2)
    return replace(Settings(), data=replace(DataSettings(), synth=synth))


def test_a_crashed_catalogue_generation_is_never_reused(tmp_path, monkeypatch):
    generate = stored.generate

    def crash_after_the_manifest(out, synth):  # killed with the manifest written and the images not
        generate(out, synth, workers=1)
        for image in Path(out, "images").iterdir():
            image.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(stored, "generate", crash_after_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        stored.synthetic_source(str(tmp_path), tiny_synthetic())
    monkeypatch.setattr(stored, "generate", generate)
    said = []
    manifest, _ = stored.synthetic_source(str(tmp_path), tiny_synthetic(), log=said.append)
    images = list((Path(manifest).parent / "images").iterdir())
    assert said[0].startswith("generating") and len(images) >= 6
    stored.synthetic_source(str(tmp_path), tiny_synthetic(), log=said.append)
    assert said[1].startswith("reusing")


def test_presets_size_their_heavy_steps():
    smoke, paper = load_settings("smoke").resources, load_settings("paper").resources
    for step in ("train", "export", "evaluate"):
        assert getattr(paper, step).gpu == 1 and getattr(paper, step).memory > getattr(smoke, step).memory
        assert getattr(smoke, step).gpu is None  # CI-sized: no GPU asked for
    assert paper.train.shared_memory  # its DataLoader workers pass batches through /dev/shm
    assert paper.preprocess.gpu is None and paper.preprocess.disk and paper.retries >= 1


def test_a_partial_resources_section_takes_the_defaults_for_the_rest():
    settings = settings_from_dict({"resources": {"train": {"gpu": 1}}})
    assert settings.resources.train == replace(Settings().resources.train, gpu=1)
    assert settings.resources.evaluate == Settings().resources.evaluate
    complete = settings_json('{"name": "mine", "resources": {"retries": 0}}')  # what the flows' decorators read
    assert complete["resources"]["retries"] == 0 and complete["resources"]["train"]["memory"] == 4096
    with pytest.raises(ValueError, match=r"resources\.train\.memroy: unknown key; .*did you mean `memory`"):
        settings_from_dict({"resources": {"train": {"memroy": 9000}}})
