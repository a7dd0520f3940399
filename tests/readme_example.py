"""The README's quick-start files, read from the README itself, and a catalogue of their rows scaled up."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(text: str, language: str = "") -> list[str]:
    """The fenced code blocks of a Markdown text, of one language (`csv`, `yaml`) or every one."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
            if not language or lang == language]


def write_example(folder: Path, copies: int = 1, size: int = 32) -> tuple[Path, Path]:
    """The README's manifest.csv and tasks.yaml in `folder`, with a photo at every path the manifest
    names. `copies` > 1 repeats the rows (ids and photo names suffixed) to reach a catalogue a run can
    split and fit; each photo's colour follows its row's labels, so there is something to learn."""
    text = README.read_text()
    (manifest_text,), (tasks_text,) = code_blocks(text, "csv"), code_blocks(text, "yaml")
    rows = list(csv.DictReader(manifest_text.splitlines()))
    out = []
    for copy in range(copies):
        for row in rows:
            suffix = f"_{copy:03d}" if copies > 1 else ""
            images = [p.replace(row["gallery_id"], row["gallery_id"] + suffix) for p in json.loads(row["images"])]
            out.append(row | {"gallery_id": row["gallery_id"] + suffix, "images": json.dumps(images)})
    rng = np.random.default_rng(0)
    for row in out:
        colour = np.array([200 if row["has_pool"] == "true" else 60, 150 if row["property_type"] == "hotel" else 40, 90])
        for path in json.loads(row["images"]):
            pixels = np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / path)
    manifest, tasks = folder / "manifest.csv", folder / "tasks.yaml"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(out)
    tasks.write_text(tasks_text)
    return manifest, tasks
