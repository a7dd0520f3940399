"""gallery: one universal embedding for a product's photo gallery, learned by multi-task learning.

The names a user of a finished run needs, importable from the top (loaded on first use, so
`import gallery` stays light):

    from gallery import trained_run, read_embeddings, search_embeddings
    run = trained_run("latest")                      # a finished GalleryTrainFlow run
    table, meta = read_embeddings(run.embeddings_location)
    hits = search_embeddings(run.embeddings_location, images=["a.jpg"], model_run=run)
    model = load_model("model/")                     # an exported model folder (`gallery export-model`)

Layout (docs/design.md §2), imports flowing one way: data <- model <- config <- training <- retrieval <- artifact
<- evaluation <- steps / runs <- compare <- serve <- flows, cli, bench.
"""
from importlib import import_module

_PUBLIC = {
    "trained_run": "gallery.runs",
    "TrainedRun": "gallery.runs",
    "read_embeddings": "gallery.retrieval.embeddings",
    "search_embeddings": "gallery.retrieval.search",
    "load_settings": "gallery.config",
    "load_model": "gallery.artifact.loaded",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gallery' has no attribute {name!r}")
