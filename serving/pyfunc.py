"""An exported model as an MLflow model: logged with its tokenizer bundle, registered, loadable with
`mlflow.pyfunc.load_model("models:/NAME/1")` and servable with `mlflow models serve`.

predict takes a table with one column per prompt modality (`image`, `audio`: the file's bytes, PNG,
WAV, ...; `text`: the text) and, as params, `to` (the modality to generate, default text),
`max_new_tokens`, and the sampling options `temperature`, `top_k`, `top_p`, `seed` and `cfg_scale`
(serving/generate.Sampling). A param left at -1 (0 for max_new_tokens) takes the model's own default for `to`
(the training config's [generate.<modality>], kept in the export), else greedy. The rows are generated in
one batch. Each row's first non-empty column is its prompt. It returns one row per input: `to`, `ext` and
`output`, which is the text for text, else the file (PNG, WAV) in base64, so the answer is plain JSON when served.
"""

from __future__ import annotations

import base64
import warnings
from pathlib import Path

import mlflow.pyfunc

from omnistream.common.errors import BadSample, UserError

ARTIFACT = "omnistream_model"  # the exported folder, as the MLflow model's artifact
# rows per request: each row is one generation on the serving process, run one after another, so one
# request of thousands of rows would hold the server for all of them
MAX_ROWS = 64


# MLflow asks, when a PythonModel subclass is defined, for type hints on predict, under a warnings filter of
# its own (so no filter of ours reaches it): the hints would replace the signature log_and_register states
# whole (binary media inputs, `to` and `max_new_tokens` params) with one inferred from them, which cannot
# say "bytes of an image". The class is defined with its warnings caught and dropped.
with warnings.catch_warnings(record=True):

    class OmnistreamModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper around export.load_model + export.generate_from."""

        def load_context(self, context) -> None:
            from .export import generation_defaults, load_model

            self.model, self.vocab = load_model(context.artifacts[ARTIFACT])
            self.defaults = generation_defaults(context.artifacts[ARTIFACT])

        def predict(self, context, model_input, params: dict | None = None):
            import pandas as pd

            from .generate import generate_many, sampling_for

            params = params or {}
            dst = params.get("to") or "text"

            def given(name: str, kind: type, unset=-1):  # the signature's default (-1, or 0) is "not given"
                v = params.get(name)
                return None if v is None or kind(v) == unset else kind(v)

            sampling, n = sampling_for(
                self.defaults,
                dst,
                temperature=given("temperature", float),
                top_k=given("top_k", int),
                top_p=given("top_p", float),
                seed=given("seed", int),
                cfg_scale=given("cfg_scale", float),
                max_new_tokens=given("max_new_tokens", int, 0),
            )
            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            if len(rows) > MAX_ROWS:
                raise UserError(f"{len(rows)} rows in one request, at most {MAX_ROWS}: send them in several requests")
            items = []
            for i, row in enumerate(rows):
                src = next((k for k in self.vocab.names if _present(row.get(k))), None)
                if src is None:
                    raise UserError(f"each row needs one of the columns {self.vocab.names} (the prompt)")
                mod = self.vocab.by_name[src]
                value = row[src]
                data = value.encode() if isinstance(value, str) and src == "text" else _bytes(value)
                try:
                    items.append((src, mod.decode_bytes(_sniff(data, mod.keys), data)))
                except BadSample as e:
                    raise UserError(f"the {src} of row {i} cannot be read: {e.reason} ({e.detail})") from None
            out = []
            # every row in one batch through the KV cache, each held to what `dst` can decode
            for (res,) in generate_many(self.model, self.vocab, items, dst, n, sampling) if items else []:
                if isinstance(res, str):
                    out.append({"to": dst, "ext": "txt", "output": res})
                else:
                    ext, blob = self.vocab.by_name[dst].to_bytes(res)
                    out.append({"to": dst, "ext": ext, "output": base64.b64encode(blob).decode()})
            return pd.DataFrame(out, columns=["to", "ext", "output"])


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and v != v) and len(v) > 0


def _bytes(v) -> bytes:
    """A file's bytes, given as bytes or (as JSON carries them) base64 text."""
    return bytes(v) if isinstance(v, (bytes, bytearray)) else base64.b64decode(v)


def _sniff(data: bytes, keys: tuple[str, ...]) -> str:
    """The file extension the bytes are (the modality decodes by extension)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and "webp" in keys:
        return "webp"
    for magic, ext in ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpg"), (b"RIFF", "wav"), (b"fLaC", "flac")):
        if data.startswith(magic) and ext in keys:
            return ext
    return keys[0]


def log_and_register(model_dir: str | Path, name: str, tracker=None, tracking_uri: str = "") -> str:
    """Log the exported folder as an MLflow model (into the run of `tracker`, the run that trained it, when
    given; else into a new run of the store at `tracking_uri`) and register a version of `name`; returns
    "models:/NAME/VERSION". The model registry is MLflow's: a tracking backend without one is refused
    (tracking.registry_uri)."""
    if tracker is not None:
        from omnistream import tracking

        try:
            tracking_uri, run_id = tracking.registry_uri(tracker.backend, tracker.uri), tracker.run_id
        except UserError as e:
            raise UserError(f"{e} (the exported model is in {model_dir})") from None
    else:
        run_id = ""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from .export import load_model

    _, vocab = load_model(model_dir)  # refuses a folder that is not a whole exported model
    binary = {"text": "string"}
    signature = ModelSignature(
        inputs=Schema([ColSpec(binary.get(n, "binary"), n, required=False) for n in vocab.names]),
        outputs=Schema([ColSpec("string", "to"), ColSpec("string", "ext"), ColSpec("string", "output")]),
        params=ParamSchema(
            [
                ParamSpec("to", "string", "text"),
                ParamSpec("max_new_tokens", "long", 0),
                # sampling (serving/generate.Sampling): -1 is the model's default for `to` ([generate.<to>]),
                # else greedy; seed -1 draws afresh
                ParamSpec("temperature", "double", -1.0),
                ParamSpec("top_k", "long", -1),
                ParamSpec("top_p", "double", -1.0),
                ParamSpec("seed", "long", -1),
                ParamSpec("cfg_scale", "double", -1.0),
            ]
        ),
    )
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id or None), warnings.catch_warnings():
        # The signature is given whole (inputs, outputs, params): an input example would load the model and
        # generate at log time to infer what is already stated
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            # models-from-code: the model is this file of ours, not a pickled object (pyfunc_code.py says why)
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_code.py")),
            artifacts={ARTIFACT: str(model_dir)},
            signature=signature,
            registered_model_name=name,
            # omnistream itself must be installed where the model is loaded (it is not on a package index)
            pip_requirements=["torch", "numpy", "pillow", "soundfile", "tokenizers", "safetensors", "pydantic"],
        )
    version = info.registered_model_version
    if version is None:
        raise UserError(f"the tracking server at {tracking_uri} did not register {name!r} (no model registry?)")
    return f"models:/{name}/{version}"


def latest_version(tracking_uri: str, name: str) -> str:
    from omnistream.tracking.mlflow_backend import client

    versions = client(tracking_uri).search_model_versions(f"name = '{name}'")
    if not versions:
        raise UserError(f"no model {name!r} is registered at {tracking_uri}")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"
