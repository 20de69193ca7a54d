"""A corpus of malformed and hostile checkpoints, generated (never stored as binaries).

Every case copies a small valid checkpoint and damages the copy: a tiny sharded Llama
written by :func:`models.write_model`, or a bitsandbytes folder saved by transformers'
``save_pretrained`` (``nf4``, ``nf4-dq``, ``int8``). It returns what
``leanstream.load(folder, device="cpu", progress=False)`` must raise: the exact
exception class, the file the message names and, where one is concerned, the tensor
or config field (``tests/test_hostile.py`` runs them all). A damaged file the load can
do without, as transformers does (``generation_config.json``), is a warning instead:
the load goes on, and the warning names the file. Byte-level helpers are those of
``tests/test_reader_malformed.py``.

To look at (or try another loader on) the whole corpus::

    python tests/hostile.py /tmp/hostile      # one folder per case + EXPECTED.json
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from test_reader_malformed import raw_shard

import leanstream
from models import write_model

#: Damaged in most cases: a weight in a shard with other tensors around it.
T = "model.layers.0.mlp.down_proj.weight"
#: A quantized linear of the pre-quantized bases.
W = "model.layers.0.mlp.up_proj.weight"
INDEX = "model.safetensors.index.json"

#: Base folders: (how they are made); see :func:`write_bases`.
BNB = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


@dataclass(frozen=True)
class Expect:
    """What loading the damaged folder must raise."""

    error: type[BaseException]
    file: str  # a file (or folder) name that the message (and ``.file``) must contain
    tensor: str | None = None  # the tensor that the message (and ``.tensor``) must name
    field: str | None = None  # the config field that the message must name
    verify: Callable[[], None] | None = None  # a check to run after the load failed


@dataclass(frozen=True)
class Case:
    name: str
    base: str  # a key of write_bases(), or "" for an empty folder
    damage: Callable[[Path], Expect]

    def build(self, bases: dict[str, Path], folder: Path) -> Expect:
        """Copy the base into ``folder`` (which must not exist) and damage it."""
        if self.base:
            shutil.copytree(bases[self.base], folder)
        else:
            folder.mkdir(parents=True)
        return self.damage(folder)


def write_bases(root: Path) -> dict[str, Path]:
    """The valid checkpoints every case starts from."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bases = {"llama": write_model(root / "llama", "llama")}
    for name, options in BNB.items():
        model = AutoModelForCausalLM.from_pretrained(
            bases["llama"],
            quantization_config=BitsAndBytesConfig(
                **options, bnb_4bit_compute_dtype=torch.bfloat16
            ),
            device_map="cpu",
        )
        model.save_pretrained(root / name, max_shard_size="40KB")
        bases[name] = root / name
    return bases


# --- reading and rewriting a real shard -------------------------------------------


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def read_shard(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header (in file order) and the data section of a shard."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def edit_entry(folder: Path, tensor: str, **fields: Any) -> Path:
    """Rewrite ``tensor``'s header entry with ``fields`` (dtype, shape, data_offsets)."""
    path = shard_of(folder, tensor)
    header, data = read_shard(path)
    header[tensor] = {**header[tensor], **fields}
    return raw_shard(path, header, data)


def last_tensor(path: Path) -> str:
    header, _ = read_shard(path)
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


def edit_tensors(folder: Path, name: str, value: torch.Tensor | None) -> None:
    """Replace (None: drop) a tensor in its shard with safetensors, fixing the index."""
    index = json.loads((folder / INDEX).read_text())
    path = folder / index["weight_map"][name]
    tensors = load_file(path)
    if value is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})
    (folder / INDEX).write_text(json.dumps(index))


def edit_index(folder: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    path = folder / INDEX
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))
    return path


def edit_config(folder: Path, **fields: Any) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def quant_state(folder: Path, name: str) -> dict[str, Any]:
    packed = load_file(shard_of(folder, name))[name]
    return json.loads(bytes(packed.tolist()))


def as_bytes(text: str | bytes) -> torch.Tensor:
    data = text.encode() if isinstance(text, str) else text
    return torch.tensor(list(data), dtype=torch.uint8)


# --- the cases --------------------------------------------------------------------

E = leanstream
CASES: list[Case] = []


def case(name: str, base: str = "llama") -> Callable[[Callable[[Path], Expect]], Any]:
    def register(damage: Callable[[Path], Expect]) -> Callable[[Path], Expect]:
        CASES.append(Case(name, base, damage))
        return damage

    return register


@case("shard truncated in its data")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    os.truncate(path, path.stat().st_size - 100)
    return Expect(E.TruncatedFileError, path.name, last_tensor(path))


@case("shard truncated in its header")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    os.truncate(path, 40)
    return Expect(E.HeaderTooLargeError, path.name)


@case("shard truncated in its length prefix")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    os.truncate(path, 5)
    return Expect(E.TruncatedFileError, path.name)


@case("zero-length shard")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    os.truncate(path, 0)
    return Expect(E.TruncatedFileError, path.name)


def header_length(value: int) -> Callable[[Path], Expect]:
    def damage(folder: Path) -> Expect:
        path = shard_of(folder, T)
        with path.open("r+b") as f:
            f.write(struct.pack("<Q", value(path.stat().st_size)))
        return Expect(E.HeaderTooLargeError, path.name)

    return damage


case("header length past the end of the file")(header_length(lambda size: size))
case("header length over 100 MB")(header_length(lambda size: leanstream._core.MAX_HEADER_SIZE + 1))
case("header length 2**64 - 1")(header_length(lambda size: 2**64 - 1))


def header_text(change: Callable[[bytes], bytes], tensor: str | None = None) -> Any:
    def damage(folder: Path) -> Expect:
        path = shard_of(folder, T)
        header, data = read_shard(path)
        raw_shard(path, change(json.dumps(header).encode()), data)
        return Expect(E.InvalidHeaderError, path.name, tensor)

    return damage


case("header not UTF-8")(header_text(lambda h: h.replace(b"down_proj", b"down\xffproj")))
case("header not JSON")(header_text(lambda h: h[:-1]))
case("header a JSON array")(header_text(lambda h: b"[" + h + b"]"))
case("header JSON nested too deep")(header_text(lambda h: b"[" * 100_000 + b"]" * 100_000))
case("duplicate key in the header", "llama")(
    header_text(
        lambda h: h.replace(b"{", b'{"%s": {}, ' % T.encode(), 1),
        tensor=T,
    )
)


def bad_entry(error: type[BaseException], **fields: Any) -> Callable[[Path], Expect]:
    def damage(folder: Path) -> Expect:
        path = edit_entry(folder, T, **fields)
        return Expect(error, path.name, T)

    return damage


case("unknown dtype")(bad_entry(E.UnknownDtypeError, dtype="BF17"))
case("dtype of the wrong type")(bad_entry(E.InvalidHeaderError, dtype=16))
case("negative shape")(bad_entry(E.ShapeError, shape=[-64, -192]))
case("shape whose byte count overflows 64 bits")(
    bad_entry(E.ShapeError, shape=[2**32, 2**32, 2**32])
)
case("shape dimension beyond 64 bits")(bad_entry(E.ShapeError, shape=[2**70]))
case("data_offsets not matching shape x dtype")(bad_entry(E.ShapeError, data_offsets=[128, 24702]))
case("data_offsets past the end")(bad_entry(E.OffsetError, data_offsets=[10**9, 10**9 + 24576]))
case("data_offsets reversed")(bad_entry(E.OffsetError, data_offsets=[24704, 128]))
case("data_offsets negative")(bad_entry(E.OffsetError, data_offsets=[-24576, 0]))
case("data_offsets overlapping a neighbour")(bad_entry(E.OverlapError, data_offsets=[64, 24640]))


# The data section must be exactly the tensors' bytes, as safetensors requires.


def first_tensor(path: Path) -> str:
    header, _ = read_shard(path)
    header.pop("__metadata__", None)
    return min(header, key=lambda k: header[k]["data_offsets"][0])


@case("bytes appended after the last tensor (a polyglot's payload)")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    with path.open("ab") as f:
        f.write(b"PK\x03\x04" + bytes(60))
    return Expect(E.TrailingDataError, path.name)


@case("shard header emptied, its data left behind")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    header, data = read_shard(path)
    raw_shard(path, {"__metadata__": header.get("__metadata__", {})}, data)
    return Expect(E.TrailingDataError, path.name)


@case("gap before the last tensor of a shard")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    header, data = read_shard(path)
    last = last_tensor(path)
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 8, end + 8]
    raw_shard(path, header, data[:begin] + bytes(8) + data[begin:])
    return Expect(E.OffsetError, path.name, last)


@case("data section not starting at offset 0")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    header, data = read_shard(path)
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [o + 64 for o in entry["data_offsets"]]
    raw_shard(path, header, bytes(64) + data)
    return Expect(E.OffsetError, path.name, first_tensor(path))


@case("empty tensor inside another tensor's bytes")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    header, data = read_shard(path)
    inside = header[T]["data_offsets"][0] + 2
    empty = "model.layers.0.mlp.empty"
    header[empty] = {"dtype": "BF16", "shape": [0], "data_offsets": [inside, inside]}
    raw_shard(path, header, data)
    return Expect(E.OffsetError, path.name, empty)


@case("index names a shard that does not exist")
def _(folder: Path) -> Expect:
    edit_index(folder, lambda i: i["weight_map"].update({T: "model-00099-of-00099.safetensors"}))
    return Expect(E.FileNotFoundCheckpointError, "model-00099-of-00099.safetensors", T)


@case("index puts a tensor in the wrong shard")
def _(folder: Path) -> Expect:
    other = shard_of(folder, W).name
    edit_index(folder, lambda i: i["weight_map"].update({T: other}))
    return Expect(E.IndexMismatchError, INDEX, T)


@case("index lists a tensor no shard has")
def _(folder: Path) -> Expect:
    edit_index(
        folder, lambda i: i["weight_map"].update({"model.ghost.weight": shard_of(folder, T).name})
    )
    return Expect(E.IndexMismatchError, INDEX, "model.ghost.weight")


@case("index does not list a shard's tensor")
def _(folder: Path) -> Expect:
    edit_index(folder, lambda i: i["weight_map"].pop(T))
    return Expect(E.IndexMismatchError, INDEX, T)


@case("index not JSON")
def _(folder: Path) -> Expect:
    (folder / INDEX).write_text('{"weight_map": {"a": ')
    return Expect(E.IndexMismatchError, INDEX)


@case("index names a file outside the folder")
def _(folder: Path) -> Expect:
    edit_index(folder, lambda i: i["weight_map"].update({T: "../../../etc/passwd"}))
    return Expect(E.IndexMismatchError, INDEX, T)


@case("index names a FIFO (would block a plain open)")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    path.unlink()
    os.mkfifo(path)
    return Expect(E.CheckpointError, path.name)


@case("index names a folder")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    path.unlink()
    path.mkdir()
    return Expect(E.CheckpointError, path.name)


@case("same tensor in two shards")
def _(folder: Path) -> Expect:
    first, second = shard_of(folder, T), shard_of(folder, W)
    (folder / INDEX).unlink()
    tensors = load_file(second)
    tensors[T] = load_file(first)[T]
    save_file(tensors, second, metadata={"format": "pt"})
    later = max(first.name, second.name)  # shards are opened in name order
    return Expect(E.DuplicateTensorError, later, T)


@case("folder with only config.json")
def _(folder: Path) -> Expect:
    for path in folder.glob("*.safetensors"):
        path.unlink()
    (folder / INDEX).unlink()
    return Expect(E.FileNotFoundCheckpointError, folder.name)


@case("empty folder", base="")
def _(folder: Path) -> Expect:
    return Expect(E.ConfigError, "config.json")


def pickle_only(index: bool) -> Callable[[Path], Expect]:
    def damage(folder: Path) -> Expect:
        marker = folder.parent / "unpickled"

        class Payload:  # unpickling this would create ``marker``
            def __reduce__(self) -> tuple[Any, ...]:
                return (open, (str(marker), "w"))

        for path in [*folder.glob("*.safetensors"), folder / INDEX]:
            path.unlink()
        name = "pytorch_model.bin"
        (folder / name).write_bytes(pickle.dumps(Payload()))
        if index:
            (folder / f"{name}.index.json").write_text(json.dumps({"weight_map": {T: name}}))

        def never_unpickled() -> None:
            assert not marker.exists(), "the pickle was loaded"

        return Expect(E.UnsupportedCheckpointError, name, verify=never_unpickled)

    return damage


case("only pytorch_model.bin (pickle)")(pickle_only(index=False))
case("only a sharded pickle checkpoint")(pickle_only(index=True))


@case("config.json missing")
def _(folder: Path) -> Expect:
    (folder / "config.json").unlink()
    return Expect(E.ConfigError, "config.json")


@case("config.json not JSON")
def _(folder: Path) -> Expect:
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return Expect(E.ConfigError, "config.json")


@case("config.json a FIFO (would block a plain read)")
def _(folder: Path) -> Expect:
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    return Expect(E.ConfigError, "config.json")


@case("config.json a link to /dev/zero (endless)")
def _(folder: Path) -> Expect:
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    return Expect(E.ConfigError, "config.json")


@case("config.json of an unknown model_type")
def _(folder: Path) -> Expect:
    edit_config(folder, model_type="no-such-model")
    return Expect(E.ConfigError, "config.json")


@case("config.json with zero attention heads")
def _(folder: Path) -> Expect:
    edit_config(folder, num_attention_heads=0)
    return Expect(E.ConfigError, "config.json")


@case("config.json with a negative hidden size")
def _(folder: Path) -> Expect:
    edit_config(folder, hidden_size=-64, head_dim=-16)
    return Expect(E.ConfigError, "config.json")


@case("config.json with an unknown dtype")
def _(folder: Path) -> Expect:
    edit_config(folder, dtype="float99")
    return Expect(E.ConfigError, "config.json")


#: JSON nested far deeper than Python's recursion limit (json.loads raises RecursionError)
DEEP = "[" * 100_000 + "]" * 100_000


@case("config.json nested 100,000 deep")
def _(folder: Path) -> Expect:
    path = folder / "config.json"
    path.write_text(path.read_text().rstrip()[:-1] + f', "deep": {DEEP}}}')
    return Expect(E.ConfigError, "config.json")


@case("config.json nested 150 deep (json parses it; no config nests so deep)")
def _(folder: Path) -> Expect:
    path = folder / "config.json"
    path.write_text(path.read_text().rstrip()[:-1] + f', "deep": {"[" * 150}{"]" * 150}}}')
    return Expect(E.ConfigError, "config.json")


@case("config.json's quantization_config nested 100,000 deep", "nf4")
def _(folder: Path) -> Expect:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["deep"] = "DEEP"
    path.write_text(json.dumps(config).replace('"DEEP"', DEEP))
    return Expect(E.ConfigError, "config.json")


@case("model_index.json nested 100,000 deep", base="")
def _(folder: Path) -> Expect:
    (folder / "model_index.json").write_text(f'{{"_class_name": "FluxPipeline", "x": {DEEP}}}')
    return Expect(E.ConfigError, "model_index.json")


def generation_config(text: str) -> Callable[[Path], Expect]:
    """A generation_config.json transformers cannot use: the load goes on with a warning,
    as transformers' own (which falls back on the one made from config.json)."""

    def damage(folder: Path) -> Expect:
        (folder / "generation_config.json").write_text(text)
        return Expect(UserWarning, "generation_config.json")

    return damage


case("generation_config.json not JSON")(generation_config('{"max_length": '))
case("generation_config.json nested 100,000 deep")(generation_config(DEEP))
case("generation_config.json a JSON array")(generation_config("[1, 2]"))
case("generation_config.json with values transformers refuses")(
    generation_config('{"max_new_tokens": -5}')
)


def quantized_fields(field: str, value: Any) -> Callable[[Path], Expect]:
    """A leanstream field of quantization_config (the modules stored quantized) of the
    wrong type."""

    def damage(folder: Path) -> Expect:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config["quantization_config"][field] = value
        path.write_text(json.dumps(config))
        return Expect(E.ConfigError, "config.json", field=field)

    return damage


case("leanstream_quantized_embeddings a string", "nf4")(
    quantized_fields("leanstream_quantized_embeddings", "model.embed_tokens")
)
case("leanstream_quantized_experts a number", "nf4")(
    quantized_fields("leanstream_quantized_experts", 5)
)
case("leanstream_quantized_lm_head a list of numbers", "nf4")(
    quantized_fields("leanstream_quantized_lm_head", [1])
)
case("llm_int8_skip_modules a string", "int8")(quantized_fields("llm_int8_skip_modules", "lm_head"))


@case("checkpoint misses a tensor the model needs")
def _(folder: Path) -> Expect:
    edit_tensors(folder, T, None)
    return Expect(E.MismatchError, folder.name, T)


@case("checkpoint has an extra tensor")
def _(folder: Path) -> Expect:
    extra = "model.layers.0.mlp.extra.weight"
    path = shard_of(folder, T)
    tensors = load_file(path)
    tensors[extra] = torch.zeros(3, dtype=torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    edit_index(folder, lambda i: i["weight_map"].update({extra: path.name}))
    return Expect(E.MismatchError, folder.name, extra)


@case("tensor shape disagrees with config.json")
def _(folder: Path) -> Expect:
    edit_config(folder, intermediate_size=128)
    return Expect(E.MismatchError, folder.name, "model.layers.0.mlp.down_proj.weight")


@case("tensor of a dtype torch does not have (F6_E2M3)")
def _(folder: Path) -> Expect:
    path = shard_of(folder, T)
    header, data = read_shard(path)
    shape = header[T]["shape"]
    raw = bytes(shape[0] * shape[1] * 6 // 8)
    # the shard laid out again around the smaller tensor: valid but for the dtype
    entries = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    out = b""
    for name in entries:
        begin, end = header[name]["data_offsets"]
        piece = raw if name == T else data[begin:end]
        header[name]["data_offsets"] = [len(out), len(out) + len(piece)]
        out += piece
    header[T]["dtype"] = "F6_E2M3"
    raw_shard(path, header, out)
    return Expect(E.UnsupportedCheckpointError, path.name, T)


# pre-quantized bitsandbytes folders saved by transformers


@case("nf4: quant_state bytes garbled", "nf4")
def _(folder: Path) -> Expect:
    name = f"{W}.quant_state.bitsandbytes__nf4"
    packed = load_file(shard_of(folder, name))[name]
    edit_tensors(folder, name, packed ^ 0x5A)
    return Expect(E.UnsupportedCheckpointError, "config.json", W)


@case("nf4: quant_state valid JSON, blocksize 0", "nf4")
def _(folder: Path) -> Expect:
    name = f"{W}.quant_state.bitsandbytes__nf4"
    state = {**quant_state(folder, name), "blocksize": 0}
    edit_tensors(folder, name, as_bytes(json.dumps(state)))
    return Expect(E.UnsupportedCheckpointError, "config.json", W)


@case("nf4: quant_state names an unknown dtype", "nf4")
def _(folder: Path) -> Expect:
    name = f"{W}.quant_state.bitsandbytes__nf4"
    state = {**quant_state(folder, name), "dtype": "float99"}
    edit_tensors(folder, name, as_bytes(json.dumps(state)))
    return Expect(E.UnsupportedCheckpointError, "config.json", W)


@case("nf4: absmax of the wrong length", "nf4")
def _(folder: Path) -> Expect:
    name = f"{W}.absmax"
    edit_tensors(folder, name, load_file(shard_of(folder, name))[name][:-5].clone())
    return Expect(E.MismatchError, "config.json", name)


@case("nf4: quant_map of the wrong length", "nf4")
def _(folder: Path) -> Expect:
    name = f"{W}.quant_map"
    edit_tensors(folder, name, torch.zeros(4))
    return Expect(E.MismatchError, "config.json", name)


@case("nf4: absmax missing", "nf4")
def _(folder: Path) -> Expect:
    edit_tensors(folder, f"{W}.absmax", None)
    return Expect(E.MismatchError, folder.name, f"{W}.absmax")


@case("nf4: packed weight of the wrong size", "nf4")
def _(folder: Path) -> Expect:
    edit_tensors(folder, W, torch.zeros(6000, 1, dtype=torch.uint8))
    return Expect(E.MismatchError, folder.name, W)


@case("nf4-dq: nested_absmax of the wrong length", "nf4-dq")
def _(folder: Path) -> Expect:
    name = f"{W}.nested_absmax"
    edit_tensors(folder, name, torch.zeros(7))
    return Expect(E.MismatchError, "config.json", name)


@case("int8: SCB of the wrong length", "int8")
def _(folder: Path) -> Expect:
    name = "model.layers.0.mlp.up_proj.SCB"
    edit_tensors(folder, name, torch.ones(100))
    return Expect(E.MismatchError, "config.json", name)


def edit_quant_state(folder: Path, change: Callable[[dict[str, Any]], str]) -> None:
    """Rewrite the JSON of ``W``'s 4-bit quant state as ``change(state)`` returns it."""
    name = f"{W}.quant_state.bitsandbytes__nf4"
    edit_tensors(folder, name, as_bytes(change(quant_state(folder, name))))


def bad_quant_state(change: Callable[[dict[str, Any]], str]) -> Callable[[Path], Expect]:
    def damage(folder: Path) -> Expect:
        edit_quant_state(folder, change)
        return Expect(E.UnsupportedCheckpointError, "config.json", W)

    return damage


case("nf4: quant_state JSON nested 100,000 deep", "nf4")(
    bad_quant_state(lambda state: json.dumps(state)[:-1] + f', "deep": {DEEP}}}')
)
case("nf4-dq: quant_state nested_offset 10**400", "nf4-dq")(
    bad_quant_state(lambda state: json.dumps({**state, "nested_offset": 10**400}))
)
case("nf4-dq: quant_state nested_offset NaN", "nf4-dq")(
    bad_quant_state(lambda state: json.dumps({**state, "nested_offset": float("nan")}))
)
case("nf4-dq: quant_state nested_offset a string", "nf4-dq")(
    bad_quant_state(lambda state: json.dumps({**state, "nested_offset": "nan"}))
)
case("nf4-dq: quant_state nested_dtype names a torch function", "nf4-dq")(
    bad_quant_state(lambda state: json.dumps({**state, "nested_dtype": "save"}))
)
case("nf4: quant_state dtype names a torch function", "nf4")(
    bad_quant_state(lambda state: json.dumps({**state, "dtype": "save"}))
)


def nan_in(stat: str) -> Callable[[Path], Expect]:
    """A NaN among ``W``'s ``stat`` statistics (NaN outputs at the first forward)."""

    def damage(folder: Path) -> Expect:
        name = f"{W.removesuffix('weight')}{stat}"
        values = load_file(shard_of(folder, name))[name].clone()
        values[0] = float("nan")
        edit_tensors(folder, name, values)
        return Expect(E.UnsupportedCheckpointError, "config.json", name)

    return damage


case("nf4: absmax with a NaN", "nf4")(nan_in("weight.absmax"))
case("nf4-dq: nested_absmax with a NaN", "nf4-dq")(nan_in("weight.nested_absmax"))
case("int8: SCB with a NaN", "int8")(nan_in("SCB"))


def main(out: Path) -> None:
    """Write every case to ``out/<n>-<name>/`` and what it must raise to EXPECTED.json."""
    bases = write_bases(out / "_bases")
    expected = {}
    for n, c in enumerate(CASES):
        folder = out / f"{n:02d}-{c.name.replace(' ', '-').replace('/', '-')}"
        if folder.exists():
            shutil.rmtree(folder)
        e = c.build(bases, folder)
        expected[folder.name] = {
            "error": e.error.__name__,
            "file": e.file,
            "tensor": e.tensor,
            "field": e.field,
        }
    (out / "EXPECTED.json").write_text(json.dumps(expected, indent=1))
    print(f"{len(CASES)} cases in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
