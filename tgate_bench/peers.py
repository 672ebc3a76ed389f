"""Other node packs in the benchmark: the `peer=` entries of --variants, the node each applies and its inputs.

A peer entry is `peer=PATH[:NODE[:NAME=VALUE,NAME=VALUE...]]`, among the pack's own variants in
--variants, in the order the rounds run them:

    --variants baseline,tgate,peer=PATH/ComfyUI_TGate:TGateApplySimple:start_at=0.4,deepcache,\\
peer=PATH/ComfyUI-deepcache:DeepCache:cache_interval=3,cache_depth=0

The inputs after NODE continue over the commas up to the next entry that is a variant name or
another `peer=`; `peer=PATH::NAME=VALUE` sets inputs and leaves the node to be chosen. A value is
read as the type the node declares for that input (INT, FLOAT, BOOLEAN, a combo's options, STRING)
and checked against its min and max. Without NODE the pack's one MODEL -> MODEL node that is not
deprecated (ComfyUI's DEPRECATED flag, or "deprecated" in its id or display name) is used; with none
or several, the benchmark stops and lists them. The pack is loaded by ComfyUI's own loader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class PeerError(SystemExit):
    """A peer entry the benchmark cannot use; stops it with the message (the candidates listed)."""


@dataclass(frozen=True)
class PeerSpec:
    path: Path
    node: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # as written; typed by the node's declaration

    @property
    def text(self) -> str:
        inputs = ",".join(f"{k}={v}" for k, v in self.inputs.items())
        return f"peer={self.path}" + (f":{self.node or ''}:{inputs}" if inputs else f":{self.node}" if self.node else "")


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _input(text: str, entry: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not _NAME.match(name.strip()):
        raise PeerError(f"{entry!r}: {text!r} is not NAME=VALUE")
    return name.strip(), value.strip()


def parse_peer(entry: str) -> PeerSpec:
    """One `peer=PATH[:NODE[:NAME=VALUE,...]]` entry (the inputs part may hold commas)."""
    if not entry.startswith("peer="):
        raise PeerError(f"{entry!r} is not a peer entry (peer=PATH[:NODE[:NAME=VALUE,...]])")
    rest = entry[len("peer=") :]
    drive = ""
    if re.match(r"^[A-Za-z]:[\\/]", rest):  # a Windows drive letter is part of the path
        drive, rest = rest[:2], rest[2:]
    path, _, tail = rest.partition(":")
    node, _, inputs_text = tail.partition(":")
    if not (drive + path).strip():
        raise PeerError(f"{entry!r}: no path (peer=PATH[:NODE[:NAME=VALUE,...]])")
    inputs = dict(_input(part, entry) for part in inputs_text.split(",") if part.strip())
    return PeerSpec(Path(drive + path), node.strip() or None, inputs)


def parse_variants(text: str) -> list[str | PeerSpec]:
    """--variants, in order: own variant names as strings, peer entries as PeerSpec. A NAME=VALUE item
    after a peer entry with inputs is one more input of that entry."""
    entries: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("peer=") or "=" not in item:
            entries.append(item)
        elif entries and entries[-1].startswith("peer=") and entries[-1][len("peer=") :].count(":") >= 2:
            entries[-1] += "," + item
        else:
            raise PeerError(f"--variants: {item!r} follows no peer=PATH:NODE:NAME=VALUE entry")
    return [parse_peer(e) if e.startswith("peer=") else e for e in entries]


# -- the node ---------------------------------------------------------------------------------------
def declared_inputs(cls) -> dict[str, tuple]:
    """The node's required and optional inputs, name -> (type, options dict)."""
    declared = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in (declared.get(section) or {}).items():
            spec = tuple(spec) if isinstance(spec, list | tuple) else (spec,)
            out[name] = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return out


def is_model_patch(cls) -> bool:
    """A node taking a MODEL input named model and returning one MODEL."""
    try:
        returns = tuple(getattr(cls, "RETURN_TYPES", ()) or ())
        inputs = declared_inputs(cls)
    except Exception:  # noqa: BLE001 - a node whose declaration fails is no candidate
        return False
    return returns == ("MODEL",) and "model" in inputs and inputs["model"][0] == "MODEL"


def deprecated_by(node_id: str, cls, display_name: str | None) -> str | None:
    """Why a node counts as deprecated (ComfyUI's DEPRECATED flag, or the word in its id or display name), else None."""
    if getattr(cls, "DEPRECATED", False) is True:
        return "DEPRECATED flag"
    for what, text in (("id", node_id), ("display name", display_name or "")):
        if "deprecated" in text.lower():
            return f"{what} {text!r}"
    return None


def describe(node_id: str, cls, display_name: str | None) -> str:
    shown = f"{node_id} ({display_name})" if display_name and display_name != node_id else node_id
    if not is_model_patch(cls):
        return f"{shown}: not MODEL -> MODEL"
    why = deprecated_by(node_id, cls, display_name)
    return f"{shown}: MODEL -> MODEL, deprecated ({why})" if why else f"{shown}: MODEL -> MODEL"


def choose_node(path: Path, ids: list[str], classes: dict, display_names: dict, node: str | None) -> str:
    """The node of the pack at `path` (its node ids `ids`) the benchmark applies: `node` when given
    and a MODEL -> MODEL node of the pack, else the one MODEL -> MODEL node that is not deprecated.
    PeerError, listing the pack's nodes, where neither is so."""
    listing = "\n  ".join(describe(i, classes[i], display_names.get(i)) for i in ids) or "(no nodes)"
    if node is not None:
        if node in ids and is_model_patch(classes[node]):
            return node
        why = "is not one of its nodes" if node not in ids else "is not a MODEL -> MODEL node"
        raise PeerError(f"peer {path}: {node} {why}; its nodes:\n  {listing}")
    usable = [i for i in ids if is_model_patch(classes[i]) and not deprecated_by(i, classes[i], display_names.get(i))]
    if len(usable) == 1:
        return usable[0]
    problem = "no MODEL -> MODEL node that is not deprecated" if not usable else f"{len(usable)} candidates ({', '.join(usable)})"
    raise PeerError(f"peer {path}: {problem}; name one as peer={path}:NODE. Its nodes:\n  {listing}")


def _typed(name: str, value: str, kind, options: dict, node_id: str):
    def fail(expected: str):
        raise PeerError(f"{node_id}: input {name}={value!r} is not {expected}")

    if isinstance(kind, list | tuple):  # a combo: its options
        for option in kind:
            if str(option) == value:
                return option
        fail(f"one of {list(kind)}")
    if kind == "INT":
        if not re.fullmatch(r"[+-]?\d+", value):
            fail("an INT")
        typed = int(value)
    elif kind == "FLOAT":
        try:
            typed = float(value)
        except ValueError:
            fail("a FLOAT")
    elif kind == "BOOLEAN":
        if value.lower() not in ("true", "false"):
            fail("a BOOLEAN (true or false)")
        return value.lower() == "true"
    elif kind == "STRING":
        return value
    else:  # a type the benchmark does not know: a JSON literal, else the text
        try:
            return json.loads(value)
        except ValueError:
            return value
    low, high = options.get("min"), options.get("max")
    if (low is not None and typed < low) or (high is not None and typed > high):
        fail(f"within [{low}, {high}]")
    return typed


def node_inputs(node_id: str, cls, given: dict[str, str]) -> dict:
    """The node's inputs other than `model`: its declared defaults, with `given` (text) read as the
    declared types. PeerError for an input the node does not have or a value it does not take."""
    declared = declared_inputs(cls)
    kwargs = {name: opts["default"] for name, (_, opts) in declared.items() if name != "model" and "default" in opts}
    for name, value in given.items():
        if name not in declared or name == "model":
            others = ", ".join(n for n in declared if n != "model")
            raise PeerError(f"{node_id} has no input {name!r}; its inputs: {others}")
        kind, opts = declared[name]
        kwargs[name] = _typed(name, value, kind, opts, node_id)
    return kwargs


@dataclass
class Peer:
    spec: PeerSpec
    node: str
    display_name: str | None
    inputs: dict
    apply: Callable  # model -> patched model

    def record(self) -> dict:
        return {
            "spec": self.spec.text,
            "path": str(self.spec.path),
            "node": self.node,
            "display_name": self.display_name,
            "inputs": self.inputs,
        }


def load_peer(nodes, spec: PeerSpec, loaded: dict[Path, list[str]], load_pack) -> Peer:
    """Load the pack of `spec` through ComfyUI's loader (once per path: `loaded` keeps each path's
    node ids) and resolve its node and inputs."""
    path = spec.path.resolve()
    if path not in loaded:
        if not path.exists():
            raise PeerError(f"peer {spec.path}: no such file or folder")
        new = set(load_pack(nodes, path))
        loaded[path] = [i for i in nodes.NODE_CLASS_MAPPINGS if i in new]  # in the pack's own order
        if not loaded[path]:
            raise PeerError(f"peer {path}: ComfyUI registered no new node from it (one already loaded under the same ids?)")
    ids = loaded[path]
    names = nodes.NODE_DISPLAY_NAME_MAPPINGS
    node_id = choose_node(path, ids, nodes.NODE_CLASS_MAPPINGS, names, spec.node)
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    kwargs = node_inputs(node_id, cls, spec.inputs)

    def apply(model, cls=cls, kwargs=kwargs):
        out = getattr(cls(), cls.FUNCTION)(model=model, **kwargs)
        out = getattr(out, "result", out)  # a V3 node's NodeOutput
        return out[0]

    return Peer(spec, node_id, names.get(node_id), kwargs, apply)
