"""The one module of gallery/ that talks to Metaflow: finished training runs, and what flows share.

Everything else in gallery/ is plain Python, testable without Metaflow.
"""
from __future__ import annotations

import getpass
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from metaflow import metaflow_config
from metaflow.exception import MetaflowException

import gallery.storage as storage
from gallery.config import Settings, SettingsError, settings_json
from gallery.errors import UserError

if TYPE_CHECKING:
    import torch

    from gallery.model.gallery_model import GalleryModel
    from gallery.training.distributed import Ranks

TRAIN_FLOW = "GalleryTrainFlow"


class InputError(MetaflowException):
    """Bad input to a flow: shown as a headline and the message, without a traceback."""

    headline = "Input error"


@contextmanager
def as_input_error():
    """Inside a step: a UserError (contract violation, unusable input) becomes Metaflow's headline error."""
    try:
        yield
    except UserError as e:
        raise InputError(str(e)) from None


class BadSettings(InputError):
    """Settings that cannot run: stops `run` before any step, shown as a headline and every problem."""

    headline = "Settings error"


def flow_settings(text: str) -> dict:
    """The flows' parser of their `settings` Config (a preset file or --config-value JSON): checked when
    Metaflow reads it, before any step starts, and returned complete (see gallery.config.settings_json)."""
    try:
        return settings_json(text)
    except SettingsError as e:
        raise BadSettings(str(e)) from None


def name_the_user(log=lambda line: print(line, file=sys.stderr)) -> str | None:
    """Give Metaflow a user name where the environment has none it accepts.

    Metaflow records who started each run and refuses to run without a name from METAFLOW_USER,
    SUDO_USER, USERNAME or USER, other than root: a container (`docker run` as root) sets none. Then
    the name comes from the OS account (root is called local-root), is put in USERNAME, which
    Metaflow reads and the steps' processes inherit, and is said once. Returns the name it chose.
    """
    from metaflow.util import get_username

    if get_username():
        return None
    try:
        account = getpass.getuser()  # LOGNAME, USER, ... then the password database
    except (KeyError, OSError):      # a uid with no account (docker run --user 1234)
        account = f"uid{os.getuid()}"
    name = "local-root" if account == "root" else account
    os.environ["USERNAME"] = name
    log(f"gallery: no user name for Metaflow in the environment (USERNAME and USER unset, or root): runs are "
        f"recorded as user {name!r}, from the OS account; set USERNAME to choose another")
    return name


class RunNotFound(UserError):
    """The training run asked for does not exist or did not finish."""


@dataclass
class TrainedRun:
    """What a finished GalleryTrainFlow run leaves for later use: its settings, model and embeddings."""

    run_id: str
    settings: Settings
    checkpoints: str                 # the exported model's folder: it rebuilds the model alone
    embeddings_location: str
    manifest_location: str = ""  # the catalogue it was trained on: attributes and photos for `gallery serve`
    tasks_location: str = ""

    def model(self) -> GalleryModel:
        from gallery.training.checkpoints import load_trained  # here: a flow's light steps never import torch

        return load_trained(self.checkpoints)


def trained_run(run: str = "latest") -> TrainedRun:
    """A successful GalleryTrainFlow run by id, or the latest successful one."""
    found = finished_run(run)
    data = found["end"].task.data
    return TrainedRun(found.id, data.run_settings, data.checkpoint_locations[data.reference], data.embeddings_location,
                      data.manifest_location, data.tasks_location)


def finished_run(run: str = "latest"):
    """The metaflow Run of a successful GalleryTrainFlow run by id, or the latest successful one."""
    from metaflow import Flow, Run, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    try:
        found = Flow(TRAIN_FLOW).latest_successful_run if run == "latest" else Run(f"{TRAIN_FLOW}/{run}")
    except MetaflowNotFound:
        raise RunNotFound(f"no {TRAIN_FLOW} run {run!r} in this Metaflow datastore; pass the id of a finished "
                          f"run (`python flows/train_flow.py run` prints it) or 'latest'") from None
    if found is None:
        raise RunNotFound(f"no successful {TRAIN_FLOW} run yet: run `python flows/train_flow.py run` first")
    if not found.successful:
        raise RunNotFound(f"{TRAIN_FLOW} run {run} did not finish successfully: `python flows/train_flow.py resume` it, "
                          "or pass another run")
    return found


def checkpoints_to_resume(store_root: str, *parts: str, markers=("last.pt",)) -> str | None:
    """Checkpoints a re-run step continues from: this run's (a retry), else the origin run's (a `resume`).

    A folder qualifies when it holds one of `markers` (a resumable `last.pt`, or a finished result).
    """
    from metaflow import current

    for run_id in (current.run_id, current.origin_run_id):
        if run_id and any(storage.exists(storage.join(store_root, run_id, *parts, m)) for m in markers):
            return storage.join(store_root, run_id, *parts)
    return None


def use_metaflow_s3_settings() -> None:
    """Let gallery.storage reach s3:// as Metaflow's S3 client does: the endpoint and CA bundle of its
    client parameters (METAFLOW_S3_ENDPOINT_URL, METAFLOW_S3_VERIFY_CERTIFICATE, or
    METAFLOW_DATATOOLS_CLIENT_PARAMS), from the environment or ~/.metaflowconfig (METAFLOW_PROFILE).
    Flows call it at import, so every step does; the `gallery` command calls it too."""
    params = metaflow_config.DATATOOLS_CLIENT_PARAMS
    storage.configure_s3(endpoint_url=params.get("endpoint_url"), ca_bundle=params.get("verify"))


def default_store_root() -> str:
    """Inside a step: beside the run's Metaflow datastore, as recorded in the task's metadata
    (`.gallery/` next to a local `.metaflow/`, or `<s3 datastore root>/gallery`)."""
    from metaflow import current

    root = current.task.metadata_dict["ds-root"]
    if storage.is_uri(root):
        return storage.join(root, "gallery")
    return str(Path(root).parent / ".gallery")


def runs_locally() -> bool:
    """Inside a step: whether it executes in Metaflow's local runtime, beside its sibling tasks on this
    machine (remote compute, @kubernetes or @batch, says where it runs in METAFLOW_RUNTIME_ENVIRONMENT)."""
    return os.environ.get("METAFLOW_RUNTIME_ENVIRONMENT", "local") == "local"


def share_machine(siblings: int) -> None:
    """A fan-out's tasks run side by side when they run locally: split this machine's cores."""
    if runs_locally():
        from gallery.training.device import share_cores

        share_cores(siblings)


def parallel_workers_use_this_python() -> None:
    """Metaflow starts the extra processes of a local @parallel step with the `python` found on PATH,
    not with this interpreter: a run started as `.venv/bin/python flows/train_flow.py run` without an
    activated venv would start them in another Python (without metaflow). Call at the flow's import."""
    here = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(here, "python")) and shutil.which("python") != os.path.join(here, "python"):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def end_with_the_control_task() -> None:
    """In a local @parallel step, a node other than the first: SIGKILL this process within a second of its
    parent's exit. Metaflow's local runtime starts these nodes from the control task (node 0), which shares
    its output pipes with them, and sees the step end only when every holder of the pipes has closed them;
    a control task that fails neither stops nor waits for its nodes. Without this, a failed attempt lasts
    until its last orphan ends (another model's nodes train on to their last epoch; a node waiting on a
    collective, until the timeout), the retry waits that long, and the orphans write checkpoints beside it."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-the-control-task", daemon=True).start()


def data_parallel(workers: int) -> tuple[Ranks, torch.device]:
    """Inside a @parallel step: this node's device and its ranks among the `workers` nodes that train
    the same model (torch.distributed joined through the main node Metaflow names)."""
    import torch
    from metaflow import current

    from gallery.training.device import pick_device
    from gallery.training.distributed import join, master_port

    p = current.parallel
    local = runs_locally()  # every node on this machine
    if local and p.node_index > 0:
        end_with_the_control_task()
    device = pick_device(node=p.node_index if local else 0, distributed=workers > 1)
    own_gpu = device.type == "cuda" and (not local or torch.cuda.device_count() >= p.num_nodes)
    port = master_port(current.run_id, current.step_name, current.retry_count)
    return join(p.node_index, p.num_nodes, workers, p.main_ip, port, device, "nccl" if own_gpu else "gloo"), device


def run_train_flow(settings_file: str, datastore: str, **params) -> None:
    """The train flow run to its end in a subprocess (metaflow.Runner), in its own local datastore, with
    `params` (store, reports, ...): what `gallery bench seeds` repeats. A failed run raises, with its log's end."""
    # metaflow.Runner's vendored typing_extensions patches `typing` for TypeVar defaults, after which torch's
    # generic classes fail to import (the settings' check loads torch): torch first (tests/conftest.py too)
    import torch._dynamo  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    from metaflow import Runner

    flow = Path(__file__).resolve().parents[1] / "flows" / "train_flow.py"
    with Runner(str(flow), show_output=True, env={"METAFLOW_DATASTORE_SYSROOT_LOCAL": datastore},
                config=[("settings", settings_file)]).run(**params) as running:
        if running.status != "successful":
            raise RuntimeError(f"the train flow with {settings_file} failed: {running.stderr[-2000:]}")


def export_run_model(run: str, out: str, weighting: str | None = None, pooling: str | None = None,
                     seed: int | None = None, log=print):
    """`gallery export-model`: a finished run's model as a folder (gallery.artifact). Default: the exported
    one (the reference weighting, the preset's pooling and seed), with the binary code and evaluation of the
    run; another trained model gets sign bits (the run fitted its code on the exported model's space)."""
    from gallery.artifact.folder import export_checkpoint
    from gallery.model.identity import ModelIdentity
    from gallery.retrieval.codes import code_location, load_code, sign_code
    from gallery.training.checkpoints import checkpoint_config

    found = finished_run(run)
    data = found["end"].task.data
    reference = data.reference  # the exported model's ModelIdentity
    wanted = ModelIdentity(weighting or reference.weighting, pooling or reference.pooling,
                           reference.seed if seed is None else seed, reference.backbone)
    folders = {model: location for models in data.checkpoints_by_seed for model, location in models.items()}
    if wanted not in folders:
        trained = "; ".join(f"--weighting {i.weighting} --pooling {i.pooling} --seed {i.seed}" for i in sorted(folders))
        raise RunNotFound(f"run {found.id} trained no model with {wanted.weighting} weighting, {wanted.pooling} pooling "
                          f"and seed {wanted.seed}; it trained: {trained}")
    if wanted == reference:
        code, evaluation = load_code(code_location(data.embeddings_location)), data.card_evaluation
    else:
        log(f"run {found.id} fitted its binary code to the exported model's embeddings: this model gets sign bits")
        code, evaluation = sign_code(checkpoint_config(folders[wanted]).embedding_dim), None
    return export_checkpoint(folders[wanted], code, out, found.id, evaluation, log)
