"""A study row's label: ``method[key=value,...]`` optionally followed by ``+compress[key=value,...]``.

The label is the row's whole configuration (:func:`parse_variant` turns it into params overrides), so reports,
charts and the frontier read what a row is from its label alone: :func:`training_label` (which training a
``+compress`` row reuses), :func:`chart_label` (a short form for chart keys), :func:`figure_labels` (the extra
columns its method reports).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lora_ops.methods.base import method_class
from stages.common.params import ConfigError

#: a study row without ``+compress`` is the adapter as trained: the compress stage passes it through
UNCOMPRESSED = {"compress.rank": "none", "compress.bits": "none"}
COMPRESS_SUFFIX = "+compress"


def _settings(spec: str, section: str, body: str) -> dict[str, Any]:
    """``key=value,...`` of one bracket: a bare key belongs to ``section``, a dotted one is a full params key."""
    import yaml

    settings: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"method variant {spec!r}: {item!r} is not key=value")
        settings[key if "." in key else f"{section}.{key}"] = yaml.safe_load(value)
    return settings


def _bracketed(spec: str, part: str) -> tuple[str, str]:
    """``name[body]`` -> (name, body); ``name`` -> (name, "")."""
    if "[" not in part:
        return part.strip(), ""
    if not part.endswith("]"):
        raise ConfigError(f"method variant {spec!r}: write it as method[key=value,...]{COMPRESS_SUFFIX}[key=value,...]")
    name, body = part[:-1].split("[", 1)
    return name.strip(), body


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """A study row: ``method[key=value,...]`` optionally followed by ``+compress[key=value,...]``.

    * ``lora_drop[threshold=0.6]`` -> (label, "lora_drop", {"lora_drop.threshold": 0.6, compress off});
      a dotted key is a full params key: ``lora[adapter.rank=16]`` trains LoRA at rank 16.
    * ``+compress`` runs the compress stage with the params' ``compress`` section, and its own bracket
      changes it: ``lora+compress[rank=svd,bits=8]``. Without it the row is the adapter as trained, so
      every method can be set against its compressed self.
    """
    spec = spec.strip()
    head, plus, tail = spec.partition(COMPRESS_SUFFIX)
    if plus and tail and not tail.startswith("["):
        raise ConfigError(f"method variant {spec!r}: {COMPRESS_SUFFIX} takes its settings in brackets")
    method, body = _bracketed(spec, head)
    if not method:
        raise ConfigError(f"method variant {spec!r}: no method named")
    settings = _settings(spec, method, body)
    if plus:
        settings.update(_settings(spec, "compress", _bracketed(spec, "compress" + tail)[1]))
    else:
        settings = {**UNCOMPRESSED, **settings}
    return spec, method, settings


def training_label(spec: str) -> str:
    """The row whose training a study row uses: a ``+compress`` row trains what the row before it trains (the
    compress stage comes after finetune, so its settings never change the training)."""
    return spec.strip().partition(COMPRESS_SUFFIX)[0]


def figure_labels(methods: Iterable[str]) -> dict[str, str]:
    """column -> report header of the figures the given methods (study labels) declare, in their order."""
    out: dict[str, str] = {}
    for label in methods:
        cls = method_class(str(label))
        for column, header in (cls.figure_labels if cls is not None else {}).items():
            out.setdefault(column, header)
    return out


def chart_label(spec: str) -> str:
    """A study label short enough for a chart key: ``lora[adapter.rank=2]+compress[rank=none,bits=4]`` ->
    ``lora r2 +compress int4``; ``+compress[rank=svd,budget=energy,energy=0.9,bits=none]`` -> ``+compress svd
    budget=energy energy=0.9``. Settings that restate "off" (``none``) are dropped, a bits width reads ``int<b>``, the
    adapter's rank ``r<n>``, any other setting ``key=value`` without its section."""
    head, plus, tail = spec.partition(COMPRESS_SUFFIX)
    method, body = _bracketed(spec, head)

    def words(body: str) -> list[str]:
        out = []
        for item in filter(None, (x.strip() for x in body.split(","))):
            key, _, value = item.partition("=")
            key = key.strip().rsplit(".", 1)[-1]
            value = value.strip()
            if value.lower() in ("none", "null") and key in ("rank", "bits"):
                continue
            out.append(f"int{value}" if key == "bits" else f"r{value}" if key == "rank" and value.isdigit()
                       else value if key == "rank" else f"{key}={value}")
        return out

    parts = [method, *words(body)]
    if plus:
        parts += [COMPRESS_SUFFIX, *words(_bracketed(spec, "compress" + tail)[1])]
    return " ".join(parts)

