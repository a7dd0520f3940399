"""Read the two user inputs (manifest, task spec) and check them against `data_contracts/`.

Every violation is collected before anything stops, so a user fixes their files in one pass;
each names the file, the column or key, the offending ids/values and the fix.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from jsonschema import Draft202012Validator

import gallery.storage as storage
from gallery.data.documents import parse_document
from gallery.data.inputs import LIMIT_VARIABLES, InputProblem, Limits, MissingInput, read_bounded, read_text, size_text
from gallery.data.labels import label_key
from gallery.data.tasks import Task
from gallery.errors import ContractError, Violation, example, excerpt

CONTRACTS_DIR = resources.files("gallery") / "contracts"  # package data: data_contracts/, installed with gallery
SPLITS = ("train", "valid", "test")
RESERVED_COLUMNS = ("gallery_id", "images", "split")
MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
                    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
SWAPPED = ": are --manifest and --tasks swapped?"


def load_schema(name: str) -> dict:
    """One of the JSON Schemas in data_contracts/ (manifest, tasks, embeddings)."""
    return json.loads((CONTRACTS_DIR / f"{name}.schema.json").read_text())


@dataclass
class TaskSpec:
    path: str
    tasks: list[Task]                                   # attribute tasks, learned jointly
    holdout: list[Task] = field(default_factory=list)   # never trained on: transfer is tested on them
    metric: list[Task] = field(default_factory=list)    # identity and pairs tasks, learned jointly too

    @property
    def trained(self) -> list[Task]:
        return self.tasks + self.metric


# ---------------------------------------------------------------- task spec

def _schema_error_to_violation(path: str, err) -> Violation:
    where = "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + excerpt(p, 60, quote=False)
                    for i, p in enumerate(err.absolute_path)) or "top level"
    fixes = {
        "enum": f"use one of {err.validator_value}",
        "required": "add the missing key",
        "additionalProperties": "remove or rename the key (allowed: "
                                f"{', '.join(sorted(err.schema.get('properties', {})))})",
        "type": f"give a value of type {err.validator_value}",
        "minItems": f"give at least {err.validator_value} item(s)",
        "uniqueItems": "list each value once",
        "pattern": "name it with letters, digits, '_', '.' and '-' only, and not '.' or '..' alone (a task name is "
                   "a folder name in the run's store)",
        "not": "'classes'/'num_classes' apply to multiclass tasks only, 'positive' to binary tasks only, "
               "'file' to pairs tasks only (which name no 'column')",
    }
    problem = excerpt(err.message, 300, quote=False)  # a message holds the offending value: never all of it
    if err.validator == "not":
        problem = "a key does not fit this task's kind"
    elif err.validator == "pattern":  # the task name's: the value, not the regular expression, says what is wrong
        problem = f"task name {excerpt(err.instance, 60)} is not allowed"
    return Violation(path, where, problem, fixes.get(err.validator, "see data_contracts/tasks.schema.json"))


def load_task_spec(path) -> TaskSpec:
    """Parse and validate a YAML/JSON task spec; raise ContractError listing every problem."""
    path = str(path)
    try:
        text = read_text(path, "tasks")
    except InputProblem as e:
        fix = (f"the task spec is YAML or JSON text{SWAPPED}" if getattr(e, "found", "") == "a Parquet file"
               else "pass an existing YAML or JSON file with --tasks" if isinstance(e, MissingInput) else e.fix)
        raise ContractError([Violation(path, "file", f"cannot read the task spec: {e.reason}", fix)]) from None
    fmt = "json" if path.lower().endswith(".json") else "yaml"
    doc = parse_document(text, path, fmt, "data_contracts/examples/paper_tasks.yaml")
    errors = sorted(Draft202012Validator(load_schema("tasks")).iter_errors(doc), key=lambda e: list(e.absolute_path))
    violations = [_schema_error_to_violation(path, e) for e in errors]
    if violations:
        raise ContractError(violations)

    def build(entry) -> Task:
        classes = entry.get("classes")
        file = entry.get("file")
        return Task(name=entry["name"], column=entry.get("column"), kind=entry["kind"],
                    classes=tuple(label_key(c) for c in classes) if classes else None,
                    num_classes=entry.get("num_classes"), positive=entry.get("positive"),
                    description=entry.get("description", ""),
                    file=None if file is None else _beside(file, path))

    trained = [build(t) for t in doc["tasks"]]
    spec = TaskSpec(path, [t for t in trained if not t.is_metric], [build(t) for t in doc.get("holdout") or []],
                    [t for t in trained if t.is_metric])
    violations += _check_task_names(spec)
    if violations:
        raise ContractError(violations)
    return spec


def _beside(file: str, spec_path: str) -> str:
    """A file named in the task spec: relative paths are from the task spec's folder."""
    if storage.is_uri(file) or Path(file).is_absolute():
        return file
    return storage.join(storage.parent(spec_path), file)


def _check_task_names(spec: TaskSpec) -> list[Violation]:
    out = []
    if not spec.tasks and spec.metric:
        out.append(Violation(spec.path, "tasks", "only metric tasks (identity, pairs) are listed",
                             "list at least one attribute task (binary, multiclass or regression) beside them"))
    for t in spec.holdout:
        if t.is_metric:
            out.append(Violation(spec.path, f"holdout task {t.name!r}", f"{t.kind} tasks cannot be held out: "
                                 "the retrieval evaluation already uses the valid and test galleries as queries",
                                 "move it to `tasks`"))
    names = [t.name for t in spec.trained + spec.holdout]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        out.append(Violation(spec.path, "task names", f"duplicate task names {example(dupes)}",
                             "give every task (MTL and holdout) a unique name"))
    mtl_columns = {t.column: t.name for t in spec.trained if t.column is not None}
    for t in spec.holdout:
        if t.name in {m.name for m in spec.trained} or t.column in mtl_columns:
            out.append(Violation(spec.path, f"holdout task {t.name!r}",
                                 f"column {t.column!r} is also an MTL task ({mtl_columns.get(t.column, t.name)!r}); "
                                 "a holdout must never be seen in training",
                                 "remove it from `tasks` or from `holdout`"))
    for t in spec.trained + spec.holdout:
        if t.column in RESERVED_COLUMNS:
            out.append(Violation(spec.path, f"task {t.name!r}", f"column {t.column!r} is reserved",
                                 "point the task at a label column"))
    return out


# ---------------------------------------------------------------- manifest

def load_manifest(path) -> pd.DataFrame:
    """Read a Parquet/CSV/JSON Lines manifest as given (no validation beyond being readable).

    `images` comes back as Python lists (CSV cells are parsed from JSON text); other columns as
    the format stores them. The user's file is only read.
    """
    path = str(path)
    suffix = Path(path).suffix.lower()
    fmt = MANIFEST_FORMATS.get(suffix)
    if fmt is None:
        raise ContractError([Violation(path, "file", f"unsupported manifest format {excerpt(suffix)}",
                                       "write the manifest as .parquet, .csv or .jsonl"
                                       + (f" (a {suffix} file is a task spec{SWAPPED})" if suffix in (".yaml", ".yml") else ""))])
    try:
        data = read_bounded(path, "manifest")
    except InputProblem as e:
        missing = isinstance(e, MissingInput)
        raise ContractError([Violation(path, "file", "the manifest does not exist" if missing else e.reason,
                                       "pass an existing file with --manifest" if missing else e.fix)]) from None
    df = decode_table(path, fmt, data, RESERVED_COLUMNS)
    if "images" in df.columns:
        df["images"], bad = _images_as_lists(df["images"], from_text=(fmt == "csv"))
        if bad:
            ids = df["gallery_id"].iloc[bad] if "gallery_id" in df.columns else [f"row {i + 1}" for i in bad]
            raise ContractError([Violation(path, "column 'images'",
                                           f"{len(bad)} row(s) are not a list of image paths: {example(ids)}",
                                           'write each cell as a JSON array of strings, e.g. ["a.jpg", "b.jpg"]')])
    return df


def decode_table(path: str, fmt: str, data: bytes, text_columns) -> pd.DataFrame:
    """A table file's bytes as a frame (`fmt`: parquet, csv or jsonl); CSV cells of `text_columns` stay
    text (ids such as 007 keep their zeros). Anything unreadable is a ContractError naming the file."""
    try:
        if fmt == "parquet":
            return _read_parquet(path, data)
        if fmt == "csv":
            return pd.read_csv(io.BytesIO(data), dtype={c: "string" for c in text_columns}, keep_default_na=True,
                               encoding="utf-8")
        return _read_jsonl(path, data)
    except ContractError:
        raise
    except UnicodeDecodeError as e:
        raise ContractError([Violation(path, "file", f"is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                                       f"offset {e.start}; Latin-1 or Windows-1252?)", "save it as UTF-8")]) from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a contract problem of this file
        raise ContractError([Violation(path, "file", f"cannot be read as {fmt}: {excerpt(str(e), 300, quote=False)}",
                                       f"check that the file is valid {fmt}")]) from None


def _read_parquet(path: str, data: bytes) -> pd.DataFrame:
    """A Parquet manifest decoded batch by batch, refused as soon as it decodes past the manifest limit (a
    few KB of Parquet, dictionary- and run-length-encoded, can hold gigabytes of repeated values)."""
    limit, batches, decoded = Limits.from_env().manifest, [], 0
    with pq.ParquetFile(io.BytesIO(data)) as f:
        for batch in f.iter_batches(batch_size=65_536):
            decoded += batch.nbytes
            if decoded > limit:
                raise ContractError([Violation(path, "file", f"decodes to more than the manifest limit ({size_text(limit)})",
                                               f"split the catalogue, or raise {LIMIT_VARIABLES['manifest']}")])
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=f.schema_arrow).to_pandas()


def _read_jsonl(path: str, data: bytes) -> pd.DataFrame:
    rows = []
    text = data.decode("utf-8-sig")
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                swapped = i == 1 and _is_task_spec(text)
                raise ContractError([Violation(path, f"line {i}", f"not valid JSON ({e.msg})",
                                               f"this is a task spec{SWAPPED}" if swapped
                                               else "write one JSON object per line")]) from None
            if not isinstance(row, dict):
                raise ContractError([Violation(path, f"line {i}", "not a JSON object",
                                               "write one JSON object per line")])
            rows.append(row)
    return pd.DataFrame.from_records(rows)


def _is_task_spec(text: str) -> bool:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(doc, dict) and "tasks" in doc


def _images_as_lists(column: pd.Series, from_text: bool) -> tuple[list, list[int]]:
    out, bad = [], []
    for i, cell in enumerate(column):
        value = cell
        if from_text and isinstance(cell, str):
            try:
                value = json.loads(cell)
            except (json.JSONDecodeError, RecursionError):
                value = cell  # not a JSON array: rejected below
        elif hasattr(cell, "tolist") and not isinstance(cell, str):
            value = cell.tolist()
        if value is None or (isinstance(value, float) and pd.isna(value)):
            out.append(None)  # a missing cell; reported by validate_manifest as "no images"
            continue
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            bad.append(i)
            value = None
        out.append(value)
    return out, bad


def validate_manifest(df: pd.DataFrame, path: str, spec: TaskSpec) -> list[Violation]:
    """Structural checks from manifest.schema.json plus the task columns the spec needs."""
    schema = load_schema("manifest")
    props = schema["properties"]
    out: list[Violation] = []
    for col in schema["required"]:
        if col not in df.columns:
            out.append(Violation(path, f"column {col!r}", "required column is missing",
                                 f"add a {col!r} column ({props[col]['description']})"))
    for task in spec.trained + spec.holdout:
        if task.column is not None and task.column not in df.columns:
            out.append(Violation(path, f"column {task.column!r}",
                                 f"task {task.name!r} ({spec.path}) names a column the manifest lacks",
                                 f"add the column, or fix `column:` of task {task.name!r}; "
                                 f"manifest columns: {example(df.columns, 12)}"))
    if "gallery_id" in df.columns:
        ids = df["gallery_id"]
        empty = ids.isna() | (ids.astype("string").str.strip() == "")
        if empty.any():
            rows = [f"row {i + 1}" for i in df.index[empty]]
            out.append(Violation(path, "column 'gallery_id'", f"{int(empty.sum())} empty id(s) at {example(rows)}",
                                 "give every product a non-empty gallery_id"))
        dup = ids[~empty & ids.duplicated(keep=False)]
        if len(dup):
            out.append(Violation(path, "column 'gallery_id'",
                                 f"{dup.nunique()} id(s) appear more than once: {example(dup.unique())}",
                                 "make gallery_id unique: one row per product"))
    if "images" in df.columns:
        no_images = [i for i, imgs in enumerate(df["images"]) if not imgs or any(not s.strip() for s in imgs)]
        if no_images:
            names = df["gallery_id"].iloc[no_images] if "gallery_id" in df.columns else [f"row {i + 1}" for i in no_images]
            out.append(Violation(path, "column 'images'",
                                 f"{len(no_images)} product(s) with an empty image list or an empty path: {example(names)}",
                                 "list at least one image per product, or drop the product from the manifest"))
    if "split" in df.columns:
        allowed = set(SPLITS)
        bad = df["split"].dropna()
        bad = bad[~bad.isin(allowed)]
        if len(bad):
            out.append(Violation(path, "column 'split'", f"unknown split value(s) {example(sorted(set(bad)))} "
                                 f"(ids {example(df.loc[bad.index, 'gallery_id'])})" if "gallery_id" in df.columns
                                 else f"unknown split value(s) {example(sorted(set(bad)))}",
                                 f"use one of {list(SPLITS)} or leave it empty for the hashed split (8:1:1 unless data.split says)"))
    return out
