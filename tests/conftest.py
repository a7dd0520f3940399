import os
from pathlib import Path

import pytest

# Metaflow refuses to run without a user name; CI has none.
os.environ.setdefault("USERNAME", "tests")


@pytest.fixture(scope="session")
def small_catalogue(tmp_path_factory) -> Path:
    """A 120-gallery synthetic catalogue at 32 px, shared by the tests that only read it."""
    from gallery.synth import SynthSettings, generate

    out = tmp_path_factory.mktemp("catalogue")
    generate(out, SynthSettings(galleries=120, seed=3, image_size=32, min_images=3, max_images=6), workers=1)
    return out
