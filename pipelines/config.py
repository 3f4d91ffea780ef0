"""The `[data]` section of a run config: where shards are and how the stream is made."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .mixing import MixConfig
from .sources import SourceConfig


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exact: bool = Field(
        True, description="drop records whose modality fields are byte-identical to an earlier record's"
    )
    near: bool = Field(
        True,
        description="drop near-duplicates by each modality's signatures (switch one off with "
        "data.quality.<modality>.near_duplicates)",
    )
    shards: int = Field(
        1,
        ge=1,
        description="dedup actors; signatures are spread over them by hash. One keeps near-duplicate "
        "resolution exact; more spread memory, but a near-duplicate pair processed at the "
        "same moment by two tokenizer actors can then both be dropped",
    )


class Limits(BaseModel):
    """Bounds on what one record may cost, whatever its bytes claim. Each breach errors the record under
    its own reason (data/errored/<reason>), never the actor; none is part of a modality's fingerprint."""

    model_config = ConfigDict(extra="forbid")
    record_bytes: int = Field(
        256 << 20,
        ge=1,
        description="all members of one record together; more is errored as record_too_large (the rest is not read)",
    )
    members: int = Field(
        80,
        ge=1,
        description="members (files) per record, its parts and its labels; more is errored as too_many_members",
    )
    parts: int = Field(
        64,
        ge=1,
        description="parts of one document (KEY.<i>.<ext> members a modality reads); more is errored as too_many_parts",
    )
    header_bytes: int = Field(
        64 << 10,
        ge=512,
        description="a tar GNU long-name or pax header, which tar reads whole before the member's name can be "
        "checked; larger ends the shard as header_too_large",
    )
    member_bytes: dict[str, int] = Field(
        default_factory=dict,
        description="per modality, member sizes tighter than data.max_member_bytes, e.g. {text = 1048576, image = "
        "16777216}; more is errored as member_too_large",
    )
    shard_bytes: int = Field(
        16 << 30,
        ge=1 << 20,
        description="bytes decompressed from one compressed shard (.tar.gz, .tar.bz2, .tar.xz, .tar.zst), members "
        "skipped for their size included; more ends the shard as shard_too_large, what came before kept",
    )
    buffer_bytes: int = Field(
        256 << 20,
        ge=1,
        description="record bytes one actor holds before decoding them (records are decoded in chunks of at most 256 "
        "and at most this many bytes)",
    )


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    train_shards: list[str] = Field(
        default_factory=lambda: ["runs/demo/data/train-*.tar"],
        description="WebDataset shards to train on: paths, globs, {000..099} braces or fsspec URLs "
        "(one source; unused when data.sources is set)",
    )
    sources: dict[str, SourceConfig] = Field(
        default_factory=dict,
        description="named sources mixed by weight, each with its shards, weight (a number or "
        "[step, weight] points), `repeat` or `stop` when it runs out, and its own "
        "quality filters and limits, e.g. [data.sources.web] shards = [...] weight = 0.8; "
        "set, it replaces data.train_shards (pipelines/sources.py)",
    )
    format: str = Field(
        "webdataset",
        description="how the shards are stored: webdataset (tar shards, .tar.gz/.bz2/.xz/.zst "
        "too) or a format registered in pipelines/formats.py READERS",
    )
    format_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the format's options: for parquet, jsonl and folder a column map "
        "(columns = { text = 'caption', image = 'image' }), list columns of documents (parts), "
        "the key column and media_root (pipelines/tables.py)",
    )
    eval_shards: list[str] = Field(
        default_factory=lambda: ["runs/demo/data/eval-000.tar"],
        description="held-out shards for eval losses and cross-modal accuracy ([] = no eval)",
    )
    bundle_dir: str = Field(
        "runs/demo/tokenizers",
        description="tokenizer bundle (vocab.json + fitted state) written by `omnistream tokenizers fit`",
    )
    seq_len: int = Field(256, ge=8, le=1 << 20, description="tokens per packed training row")
    epochs: int = Field(1, ge=1, description="passes over the training shards (training stops earlier at train.steps)")
    cfg_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of documents of several parts laid out as their last part alone (the condition "
        "dropped: Emu3's null prompt), so that generation can be guided (classifier-free guidance, "
        "`generate --cfg-scale`); 0 leaves every document whole",
    )
    modality_order: Literal["random", "config"] = Field(
        "random", description="order of modalities inside a document: drawn per record by seed, or the config's order"
    )
    pack_rows: int = Field(
        32,
        ge=1,
        description="rows' worth of tokens one packing window holds: its documents are packed together (first-fit "
        "decreasing), so under one row in pack_rows is padding (0.6 to 0.75 on the demo), and a packer holds "
        "about pack_rows × seq_len tokens however large the documents (the window's document count comes from the "
        "token cache's mean)",
    )
    pack_window: int = Field(
        0, ge=0, description="documents per packing window, in place of pack_rows' count (0 = from pack_rows)"
    )
    drop_bad_parts: bool = Field(
        False,
        description="a part of a document that cannot be decoded, fails its quality checks or is longer than a row "
        "is dropped and counted (data/parts_dropped/<reason>), the rest of the document kept; off, the part "
        "errors (or filters) its whole record, naming the part",
    )
    long_documents: Literal["split", "drop"] = Field(
        "split",
        description="a document longer than a row: split where a part begins (never inside a part), each piece "
        "packed as a document (counted as data/documents_split), or filtered as document_longer_than_row",
    )
    remote_retries: int = Field(
        3,
        ge=0,
        le=20,
        description="times a remote shard's read (s3://, gs://, http...) is resumed "
        "where it broke off, with a doubling pause from 0.5 s (at most "
        "30 s); then the shard is errored as shard_read_failed, what "
        "was read whole kept, and read again by the next run",
    )
    read_deadline_s: float = Field(
        3600.0,
        gt=0,
        description="wall-clock seconds one remote shard's read may take, retries "
        "included; then it is errored as shard_read_failed (a store that "
        "trickles bytes would hold its reader forever)",
    )
    max_member_bytes: int = Field(
        64 << 20, ge=1, description="tar members larger than this are refused (untrusted-input bound)"
    )
    limits: Limits = Field(
        default_factory=Limits,
        description="per-record bounds: bytes, members, tar header size, per-modality member size, bytes buffered per"
        " actor",
    )
    fit_records: int = Field(2000, ge=10, description="records sampled from the training shards to fit the tokenizers")
    fit_cpus: int = Field(
        0,
        ge=0,
        description="CPUs, and so threads, a tokenizer fit that trains a network (fsq, codec) takes on a node without"
        " a GPU, at most the largest node's: 0 = all of them (it waits up to 2 minutes for them to come "
        "free)",
    )
    token_cache: str = Field(
        "auto",
        description="where the tokenized training shards are kept (a path or an fsspec URL): written once, by "
        "`omnistream data tokenize` or at the start of training, and read by every epoch, run and resume."
        ' "auto" = token_cache/<key>/ next to bundle_dir, one per set of settings the tokens depend on; a'
        " path named here holds one cache and refuses another's",
    )
    packers: int = Field(1, ge=1, description="actors that read the token cache and pack rows for training")
    max_error_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="stop when more than this share of the first error_rate_window records is errored: the shards are"
        " probably the wrong data",
    )
    error_rate_window: int = Field(1000, ge=1, description="records the error rate is judged on")
    quality: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-modality quality filters and near-duplicate settings, e.g. [data.quality.text] min_chars = "
        "10; the keys are each modality's Filters (`omnistream config show --doc` lists them)",
    )
    dedup: DedupConfig = Field(
        default_factory=DedupConfig, description="exact and near-duplicate removal across the stream"
    )
    mix: MixConfig = Field(
        default_factory=MixConfig, description="target token share per modality in every global batch (off when empty)"
    )
    read_cpus: float = Field(
        0.25,
        gt=0,
        description="CPUs one shard-reading task of the tokenizer fit asks of Ray (training reads inside the "
        "tokenizer actors)",
    )
    tokenizer_actors: int = Field(
        1, ge=1, description="record-processing actors (each loads the tokenizer bundle once)"
    )
    data_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources the data stages ask for, e.g. {data = 0.1} to keep tokenizing on data nodes",
    )

    @model_validator(mode="after")
    def _sources(self):
        import re

        # identifiers: a name is a metric's name and a folder of the token cache (`..` would be the parent)
        bad = [n for n in self.sources if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n)]
        if bad:
            raise ValueError(
                f"source names are identifiers of letters, digits, '_' and '-' (they name metrics and "
                f"cache folders): {bad}"
            )
        srcs = list(self.sources.values())
        for step in sorted({0, *[c for src in srcs for c in src.change_steps()]}):
            total = sum(src.weight_at(step) for src in srcs)
            if srcs and total <= 0:
                raise ValueError(f"from step {step} every source's weight is 0: nothing could be read")
            if srcs and not (1e-12 <= total < float("inf")):
                raise ValueError(
                    f"at step {step} the sources' weights sum to {total}: weights are shares, keep "
                    f"their sum between 1e-12 and a finite number (e.g. 0.7 and 0.3)"
                )
        return self

    def all_shards(self) -> list[str]:
        """The training shard specs of every source (what the tokenizers are fitted on)."""
        if self.sources:
            return [s for _, src in sorted(self.sources.items()) for s in src.shards]
        return list(self.train_shards)

    def shard_formats(self) -> list[tuple[list[str], str, dict]]:
        """Per source, by name: (its shard specs, its format, its format options over data.format_options)
        (what fitting the tokenizers and `tokenizers eval` read each source's shards with)."""
        return [
            (list(src.shards), src.format or self.format, {**self.format_options, **src.format_options})
            for _, src in self.source_items()
        ]

    def source_items(self) -> list[tuple[str, SourceConfig]]:
        """(name, SourceConfig) of the named sources, by name; the one-source shorthand as "train"."""
        if self.sources:
            return sorted(self.sources.items())
        return [("train", SourceConfig(shards=self.train_shards))]
