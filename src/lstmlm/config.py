"""The one configuration object: preset file -> CLI overrides -> model and trainer -> config.json.

Every field has a type, a default and a help text. Presets are TOML files in `lstmlm/presets/`
holding a `description`, optionally a `base` preset to start from, and any subset of the
fields; the CLI can override any field with `--set key=value` or with the field's own flag
(`--hidden-size 650`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import LstmlmError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(LstmlmError):
    """An unknown key, a value of the wrong type or an impossible value."""


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


def fits_a_seed(seed: int) -> bool:
    """Whether torch's generators take `seed` (they take 64 bits, signed or not)."""
    return -2**63 <= seed < 2**64


@dataclass
class Config:
    # data
    data: str = _f("wikitext-2", "data directory, one text file (cut into train/valid/test), or "
                                 "a dataset name: wikitext-2, wikitext-103, ptb")
    batch_size: int = _f(20, "parallel token streams per training batch")
    bptt: int = _f(35, "tokens per truncated back-propagation window")
    valid_batch_size: int = _f(10, "batch size for validation")
    test_batch_size: int = _f(10, "batch size for the final test evaluation")
    min_count: int = _f(1, "training words seen fewer times than this become <unk> (1: keep "
                           "every word; 2 or 3 for raw text with many rare words)")
    max_vocab: int = _f(0, "keep only the most frequent training words, this many with <eos> "
                           "and <unk>; the rest become <unk> (0: no limit)")
    # model
    embedding_size: int = _f(380, "word embedding size")
    hidden_size: int = _f(400, "LSTM hidden size")
    num_layers: int = _f(2, "number of LSTM layers")
    dropout_input: float = _f(0.2, "dropout on the embedding output")
    dropout_hidden: float = _f(0.2, "dropout between LSTM layers")
    dropout_output: float = _f(0.2, "dropout on the last LSTM layer's output, before the decoder")
    last_hidden_size: int = _f(0, "size of the last LSTM layer (0: hidden_size); with one "
                                  "layer, that layer's size")
    softmax: str = _f("full", "full, or adaptive: frequent words in a small head softmax, rare "
                              "ones in tail clusters computed only when needed")
    adaptive_cutoffs: str = _f("2000,10000", "adaptive softmax: comma-separated word ids where "
                                             "the tail clusters start (ids go by frequency)")
    adaptive_div_value: float = _f(4.0, "adaptive softmax: each tail's projection is this many "
                                        "times smaller than the previous one")
    # AWD-LSTM techniques (all off in the baseline)
    variational_dropout: bool = _f(False, "the three dropouts use one mask per sequence")
    dropout_embedding: float = _f(0.0, "drop whole word types from the embedding matrix")
    weight_drop: float = _f(0.0, "DropConnect on the LSTM hidden-to-hidden weights")
    tie_weights: bool = _f(False, "the decoder uses the embedding matrix")
    variable_bptt: bool = _f(False, "random BPTT length around bptt, lr scaled by length/bptt")
    bptt_max_extra: int = _f(10, "with variable_bptt, never longer than bptt + this")
    ar_alpha: float = _f(0.0, "activation regularization weight (AR)")
    tar_beta: float = _f(0.0, "temporal activation regularization weight (TAR)")
    # optimization
    optimizer: str = _f("sgd", "sgd, adam or adamw")
    lr: float = _f(0.5, "learning rate")
    momentum: float = _f(0.0, "SGD momentum (Adam and AdamW do not use it)")
    weight_decay: float = _f(1e-6, "L2 penalty (decoupled for adamw)")
    clip: float = _f(5.0, "clip the global gradient norm to this value (0: no clipping)")
    lr_schedule: str = _f("plateau", "plateau: divide the lr by lr_decay when validation stops "
                                     "improving; cosine: anneal it to min_lr over the run "
                                     "(by epochs, max_steps or max_minutes, whichever is "
                                     "furthest along)")
    lr_decay: float = _f(4.0, "plateau schedule: divide the lr by this when validation stops "
                                 "improving")
    lr_patience: int = _f(0, "validations without improvement tolerated before decaying")
    min_lr: float = _f(0.0, "never decay the learning rate below this")
    ntasgd: bool = _f(False, "switch from SGD to averaged SGD when validation stops improving")
    nonmono: int = _f(5, "NT-ASGD: switch when a validation is worse than the best of those "
                         "before the last N (non-monotone interval)")
    finetune: bool = _f(False, "set by `lstmlm finetune`: averaged SGD from the start, stop "
                              "when it stops improving")
    init_from: str = _f("", "a trained run directory whose best weights start this run; the "
                            "words its vocabulary shares with this data's keep their rows, new "
                            "words start from the mean row (the shape settings must be its)")
    average_from: float = _f(0.0, "average the weights from this fraction of the run on (0: "
                             "never; 0.8: over its last fifth): validation, the saved model and "
                             "the test use the average")
    # schedule and budget
    epochs: int = _f(40, "passes over the training split")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: no limit)")
    max_minutes: float = _f(0.0, "stop after this many minutes of training (0: no limit)")
    stop_patience: int = _f(0, "stop after this many validations in a row without a new "
                               "best validation loss (0: never)")
    eval_interval: int = _f(0, "validate every N steps (0: once per epoch)")
    eval_minutes: float = _f(0.0, "also validate every N minutes of training time (0: off)")
    checkpoint_minutes: float = _f(10.0, "also save a resumable checkpoint every N minutes "
                                   "(0: off)")
    checkpoint_steps: int = _f(0, "also save a resumable checkpoint every N steps (0: off)")
    nan_lr_factor: float = _f(0.5, "on a non-finite loss or gradient, roll back to the last "
                                   "checkpoint and multiply the learning rate by this")
    max_nan_retries: int = _f(3, "rollbacks for non-finite losses allowed before giving up")
    seed: int = _f(1111, "random seed (same seed, same numbers on the same machine; torch "
                         "uses its low 32 bits)")
    device: str = _f("cpu", "cpu, cuda or auto")
    precision: str = _f("fp32", "fp32, bf16 or fp16: autocast for the model's matrix products "
                                "(weights, losses and AR/TAR stay fp32; fp16 scales the loss)")

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Config":
        cfg = cls()
        cfg.update(values, source)
        return cfg

    def update(self, values: dict, source: str = "config", validate: bool = True) -> None:
        """Set fields from a dict of already-typed values (TOML or JSON), checking each; with
        `validate`, then the settings together."""
        for key, value in values.items():
            setattr(self, key, coerce(key, value, source))
        if validate:
            self.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def output_size(self) -> int:
        """Size of the last LSTM layer, which feeds the decoder."""
        return self.last_hidden_size or self.hidden_size

    def shape(self) -> dict:
        """What the weights' shapes follow, as the fields that set it: a run's weights load
        only into a model of the same shape (0 for last_hidden_size and the adaptive fields
        with the full softmax count as what they mean)."""
        adaptive = self.softmax == "adaptive"
        return {"embedding_size": self.embedding_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "last_hidden_size": self.output_size,
                "softmax": self.softmax, "tie_weights": self.tie_weights,
                "adaptive_cutoffs": self.cutoffs if adaptive else None,
                "adaptive_div_value": self.adaptive_div_value if adaptive else None}

    @property
    def cutoffs(self) -> list[int]:
        """`adaptive_cutoffs` as ints. A string field, so that TOML, JSON and the command line
        all write it the same way: --adaptive-cutoffs 2000,10000."""
        try:
            return [int(part) for part in self.adaptive_cutoffs.split(",")]
        except ValueError:
            raise ConfigError(f"adaptive_cutoffs must be comma-separated word ids, e.g. "
                              f"'2000,10000', got {self.adaptive_cutoffs!r}") from None

    # ---- checks -------------------------------------------------------------------------

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        sizes = ("batch_size", "bptt", "valid_batch_size", "test_batch_size", "embedding_size",
                 "hidden_size", "num_layers")
        for name in sizes + ("epochs", "min_count"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in sizes + ("last_hidden_size",):  # sizes torch can index
            need(getattr(self, name) < 2**31,
                 f"{name} must be below 2**31, got {getattr(self, name)}")
        need(fits_a_seed(self.seed), f"seed must be a 64-bit integer, got {self.seed}")
        for name, value in dataclasses.asdict(self).items():  # inf would pass the range checks
            need(not isinstance(value, float) or math.isfinite(value),
                 f"{name} must be a finite number, got {value}")
        for name in ("dropout_input", "dropout_hidden", "dropout_output", "dropout_embedding",
                     "weight_drop"):
            p = getattr(self, name)
            need(0.0 <= p < 1.0, f"{name} must be in [0, 1), got {p}")
        for name in ("momentum", "weight_decay", "clip", "max_steps", "max_minutes",
                     "eval_interval", "eval_minutes", "checkpoint_minutes", "checkpoint_steps",
                     "lr_patience", "min_lr", "last_hidden_size", "bptt_max_extra", "ar_alpha",
                     "tar_beta", "max_nan_retries", "stop_patience"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.max_vocab == 0 or self.max_vocab >= 3, "max_vocab must be 0 (no limit) or at "
             f"least 3 (<eos>, <unk> and a word), got {self.max_vocab}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 < self.nan_lr_factor < 1,
             f"nan_lr_factor must be in (0, 1), got {self.nan_lr_factor}")
        need(self.nonmono >= 1, f"nonmono must be at least 1, got {self.nonmono}")
        need(not self.tie_weights or self.output_size == self.embedding_size,
             f"tie_weights needs the last LSTM layer's size ({self.output_size}) to equal "
             f"embedding_size ({self.embedding_size}); set last_hidden_size={self.embedding_size}")
        need(not (self.ntasgd or self.finetune) or self.optimizer == "sgd",
             "ntasgd and finetune average SGD iterates; set optimizer=sgd")
        need(0 <= self.average_from < 1,
             f"average_from must be in [0, 1) (a fraction of the run), got {self.average_from}")
        need(not (self.average_from and (self.ntasgd or self.finetune)),
             "average_from and ntasgd/finetune each decide when to average the weights; "
             "set only one")
        need(self.lr_decay >= 1, f"lr_decay must be >= 1 (1: never decay), got {self.lr_decay}")
        need(self.lr_schedule in ("plateau", "cosine"),
             f"lr_schedule must be plateau or cosine, got {self.lr_schedule!r}")
        need(self.optimizer in ("sgd", "adam", "adamw"),
             f"optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        need(self.softmax in ("full", "adaptive"),
             f"softmax must be full or adaptive, got {self.softmax!r}")
        cutoffs = self.cutoffs
        need(cutoffs[0] >= 1 and all(a < b for a, b in zip(cutoffs, cutoffs[1:])),
             f"adaptive_cutoffs must be increasing word ids >= 1, got {self.adaptive_cutoffs!r}")
        need(self.adaptive_div_value >= 1,
             f"adaptive_div_value must be >= 1, got {self.adaptive_div_value}")
        need(self.device in ("cpu", "cuda", "auto"),
             f"device must be cpu, cuda or auto, got {self.device!r}")
        need(self.precision in ("fp32", "bf16", "fp16"),
             f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def did_you_mean(name: str, choices) -> str:
    """'did you mean X? ' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f"did you mean {close[0]}? " if close else ""


def _unknown_key(key: str, source: str) -> ConfigError:
    hint = did_you_mean(key, FIELDS) or "see `lstmlm train --help`"
    return ConfigError(f"{source}: unknown config key {key!r} ({hint.rstrip()})")


def coerce(key: str, value, source: str = "config"):
    """Check a typed value (from TOML/JSON) against the field's type; ints are accepted as floats."""
    if key not in FIELDS:
        raise _unknown_key(key, source)
    kind = type(FIELDS[key].default)
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ConfigError(
            f"{source}: {key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_value(key: str, text: str, source: str = "command line"):
    """Turn the string of `--set key=value` (or `--key value`) into the field's type."""
    if key not in FIELDS:
        raise _unknown_key(key, source)
    kind = type(FIELDS[key].default)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {text!r}") from None


def parse_assignment(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set hidden_size=650")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    return key, parse_value(key, value, "--set")


# ---- presets --------------------------------------------------------------------------------

def packaged_tomls(folder: str) -> dict[str, object]:
    """The .toml files shipped in lstmlm/FOLDER (presets, plans), by name."""
    return {p.name[:-5]: p for p in (resources.files("lstmlm") / folder).iterdir()
            if p.name.endswith(".toml")}


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every shipped preset, sorted by name."""
    return [(name, read_preset_file(path)[0])
            for name, path in sorted(packaged_tomls("presets").items())]


def read_toml(path, label: str, error: type[LstmlmError] = ConfigError) -> dict:
    """A TOML file's contents; `error(label: ...)` if it cannot be read or parsed."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{label}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{label}: invalid TOML ({e})") from None


def read_preset_file(path) -> tuple[str, dict]:
    data = read_toml(path, f"preset {path}")
    description = data.pop("description", "")
    return description, data


def load_preset(name: str, _chain: tuple[str, ...] = ()) -> Config:
    """A shipped preset by name, or a TOML file given by path (`_chain`: the presets that
    lead to this one through `base`)."""
    files = packaged_tomls("presets")
    if name in files:
        path = files[name]
    elif name.endswith(".toml") and Path(name).is_file():
        path = Path(name)
    elif name.endswith(".toml"):
        raise ConfigError(f"preset file {name}: not found; check the path (a base file is "
                          "looked up beside the preset file that names it)")
    else:
        raise ConfigError(f"unknown preset {name!r}: {did_you_mean(name, files)}`lstmlm presets` "
                          "lists them")
    _, values = read_preset_file(path)
    base = values.pop("base", None)
    if base is not None and not (isinstance(base, str) and base):
        raise ConfigError(f"preset {name}: base must be a preset name or a .toml path, "
                          f"got {base!r}")
    if base and base.endswith(".toml") and isinstance(path, Path):
        base = str(path.parent / base)  # a preset file's base file is found beside it

    def identity(preset: str) -> str:
        return preset if preset in files else str(Path(preset).resolve())

    chain = (*_chain, identity(name))
    if base and identity(base) in chain:
        raise ConfigError(f"preset {name}: base {base!r} leads back to {name} (a loop of bases)")
    cfg = load_preset(base, chain) if base else Config()
    cfg.update(values, source=f"preset {name}")
    return cfg
