"""Configs: frozen dataclasses, loaded from named YAML files with ``key=value`` overrides.

``load_config("demo")`` reads ``configs/demo.yaml`` shipped inside the package;
``load_config("path/to/my.yaml", ["loader.batch_size=64"])`` reads any file. Every field is
checked on construction; an error names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Sequence
from typing import Any, cast, get_type_hints

import yaml

from torch_rlds._rules import (
    ANY_MAPPING,
    BOOL,
    STRINGS,
    TEXT,
    ConfigError,
    Rule,
    check_fields,
    check_value,
    choice_rule,
    field,
    int_rule,
    nullable,
)

DEMO = "demo"
# data.trajectory is checked entry by entry when it is built (torch_rlds.trajectory).
ANY_LIST = Rule("a list of {op: ...} entries, or null", lambda value: True)


# At most this many DataLoader workers when a config does not say: beyond it a large machine
# would hold many decoded batches in flight for little gain.
MAX_DEFAULT_WORKERS = 8


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """``loader.num_workers`` when a config leaves it out: the CPUs available, at most
    :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(MAX_DEFAULT_WORKERS, available_cpus()))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how its steps become samples (see :class:`torch_rlds.RLDSDataset`).

    ``path`` is a dataset version directory, a dataset directory, a TFDS name with
    ``data_dir``, or ``demo`` for the embedded demo dataset (written to the cache on first use).
    """

    path: str = field(DEMO, TEXT, "a dataset directory, a TFDS name with data_dir, or demo")
    data_dir: str | None = field(None, nullable(TEXT), "the TFDS data directory of a name")
    split: str = field("train", TEXT, "a TFDS split expression (train, train[:95%], ...)")
    obs_window: int = field(1, int_rule(1), "observation steps per sample")
    action_horizon: int = field(16, int_rule(1), "actions per sample")
    observation_keys: tuple[str, ...] | None = field(
        None, nullable(STRINGS), "keys under steps/observation (null: all but text)")
    window_actions: bool = field(False, BOOL, "an action chunk for every observation-window "
                                              "row ([obs_window, action_horizon, A])")
    goal_relabel: bool = field(False, BOOL, "a goal frame of every camera per sample, from a "
                                            "step drawn uniformly from the current to the last")
    action_key: str = field("action", TEXT, "the action tensor under steps")
    language_key: str | None = field("language_instruction", nullable(TEXT),
                                     "the instruction under steps")
    shuffle: bool = field(True, BOOL, "permute episodes and steps")
    seed: int = field(0, int_rule(0), "the order's seed")
    order: str = field("auto", choice_rule(("auto", "global", "window")),
                       "global (every step in one permutation, resumes under any hosts and "
                       "workers), window (episodes read whole, mixed in windows), or auto: "
                       "global for local tfrecord datasets")
    shuffle_window: int = field(16, int_rule(1), "episodes whose steps are mixed together "
                                "(window order)")
    repeat: bool = field(True, BOOL, "an endless stream over epochs, or one pass")
    fast_jpeg: bool = field(True, BOOL, "JPEG pixels of tf.io.decode_jpeg (fast DCT); false: "
                                        "TFDS-numpy's (accurate DCT)")
    key_map: Any = field(None, ANY_MAPPING, "state, images, action, language: see "
                                            "torch_rlds.KeyMap")
    trajectory: Any = field(None, ANY_LIST, "per-episode transforms, in order: see "
                                            "torch_rlds.trajectory")
    filters: Any = field(None, ANY_MAPPING, "episode and sample filters: see "
                                            "torch_rlds.trajectory.FilterConfig")
    on_corrupt: str = field("raise", choice_rule(("raise", "skip")),
                            "raise, or skip (and log) an episode or sample that does not read")
    decode_threads: int | None = field(None, nullable(int_rule(1)),
                                       "threads decoding frames per reader (null: the CPUs "
                                       "divided among the workers, at most 8)")
    transform: Any = field(None, ANY_MAPPING, "see torch_rlds.transforms.TransformConfig")

    def __post_init__(self) -> None:
        check_fields(self, "data")
        self._build_sections()

    def _build_sections(self) -> None:
        """Turn the ``key_map``, ``trajectory``, ``filters`` and ``transform`` sections into
        their typed objects."""
        from torch_rlds.keymap import KeyMap, KeyMapError, check_plain_keys
        from torch_rlds.trajectory import FilterConfig, TrajectoryConfig, TrajectoryError
        from torch_rlds.transforms import TransformConfig

        if self.key_map is not None:
            try:
                object.__setattr__(self, "key_map", KeyMap.from_dict(self.key_map,
                                                                     "data.key_map"))
            except KeyMapError as e:
                raise ConfigError(str(e)) from e
            try:
                check_plain_keys(self.observation_keys, self.action_key, self.language_key,
                                 "data.")
            except KeyMapError as e:
                raise ConfigError(str(e)) from e
        try:
            object.__setattr__(self, "trajectory",
                               TrajectoryConfig.from_value(self.trajectory, "data.trajectory"))
            object.__setattr__(self, "filters",
                               FilterConfig.from_dict(self.filters, "data.filters"))
        except TrajectoryError as e:
            raise ConfigError(str(e)) from e
        try:
            object.__setattr__(self, "transform",
                               TransformConfig.from_dict(self.transform, "data.transform"))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.key_map is not None and self.transform is not None:
            try:
                self.transform.check_cameras(self.key_map)
            except ValueError as e:
                raise ConfigError(str(e)) from e


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How batches are made. ``batch_size`` is the global batch: each of P processes loads
    ``batch_size / P`` samples per step. ``num_workers`` left out (or null) is
    :func:`default_num_workers`: the CPUs available, at most :data:`MAX_DEFAULT_WORKERS`."""

    batch_size: int = field(32, int_rule(1), "the global batch (divided among processes)")
    num_workers: int | None = field(
        None, nullable(int_rule(0)),
        f"DataLoader worker processes (null: the CPUs available, at most {MAX_DEFAULT_WORKERS})")
    prefetch_factor: int = field(2, int_rule(1), "batches each worker prepares ahead")
    persistent_workers: bool = field(True, BOOL, "keep workers alive between passes")
    snapshot_every_n_steps: int = field(1, int_rule(1), "batches between worker snapshots")

    def __post_init__(self) -> None:
        check_fields(self, "loader")
        if self.num_workers is None:
            object.__setattr__(self, "num_workers", default_num_workers())


# The data fields that are RLDSDataset arguments of the same name and meaning (the others:
# path, which makes the source with split and data_dir, and transform, the sample transform).
DATASET_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig)
                       if f.name not in ("path", "split", "data_dir", "transform"))


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
    """One dataset of a mixture: a config (shipped name or YAML path) with its own overrides,
    and its sampling weight."""

    config: str
    weight: float = 1.0
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.config, str) or not self.config:
            raise ConfigError(f"mixture.datasets[].config must be a config name or path (got "
                              f"{self.config!r})")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not self.weight > 0:
            raise ConfigError(f"mixture weight of {self.config} must be a number > 0 (got "
                              f"{self.weight!r})")
        if isinstance(self.overrides, str) or not all(isinstance(o, str)
                                                      for o in self.overrides):
            raise ConfigError(f"mixture overrides of {self.config} must be a list of "
                              f"key=value strings (got {self.overrides!r})")
        object.__setattr__(self, "overrides", tuple(self.overrides))


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """Several datasets sampled with weights in one loader (:class:`torch_rlds.MixtureDataset`).

    Each entry's config supplies its dataset (path, split, key map, transforms); the top-level
    config supplies the loader. ``balance`` multiplies the weights by the datasets' sizes:
    ``episodes`` (or ``true``) their episode counts, ``steps`` their step counts (the steps
    their filters keep; Octo's weighting). ``data_dir``, when set, is the data directory of
    every entry (over the entry's own ``data.data_dir``). Weights may change on restore (see
    :class:`~torch_rlds.MixtureDataset`)."""

    datasets: tuple[MixtureEntry, ...]
    seed: int = 0
    balance: bool | str = False
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("mixture.datasets must list at least one dataset")
        entries = []
        for i, entry in enumerate(self.datasets):
            if isinstance(entry, dict):
                unknown = sorted(set(entry) - {"config", "weight", "overrides"})
                if unknown:
                    raise ConfigError(f"mixture.datasets[{i}]: unknown fields {unknown} "
                                      "(allowed: ['config', 'overrides', 'weight'])")
                entry = MixtureEntry(**entry)
            elif not isinstance(entry, MixtureEntry):
                raise ConfigError(f"mixture.datasets[{i}] must be a mapping (got {entry!r})")
            entries.append(entry)
        object.__setattr__(self, "datasets", tuple(entries))
        check_value("mixture.seed", self.seed, int_rule(0))
        check_value("mixture.balance", self.balance, BALANCE)
        check_value("mixture.data_dir", self.data_dir, nullable(TEXT))

    def entry_overrides(self, entry: MixtureEntry) -> list[str]:
        """The overrides ``entry``'s config is loaded with (``data_dir`` last)."""
        return [*entry.overrides, *([f"data.data_dir={self.data_dir}"] if self.data_dir
                                    else [])]


BALANCE = Rule("false, true (by episodes), episodes or steps",
               lambda v: (isinstance(v, bool) or v in ("episodes", "steps")))


@dataclasses.dataclass(frozen=True)
class Config:
    """A named dataset + loader configuration.

    ``process_index`` / ``process_count`` override what :func:`torch_rlds._process.process_info`
    finds (jax, then torch.distributed, then a single process).
    """

    name: str = DEMO
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    mixture: MixtureConfig | None = None
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self) -> None:
        if self.process_count is not None:
            check_value("process_count", self.process_count, int_rule(1))
        if self.process_index is not None:
            check_value("process_index", self.process_index, int_rule(0))
            if self.process_count is not None and self.process_index >= self.process_count:
                raise ConfigError(f"process_index must be < process_count "
                                  f"({self.process_index} >= {self.process_count})")

    def processes(self) -> tuple[int, int]:
        """``(process_index, process_count)``: the overrides, else what the runtime says."""
        from torch_rlds._process import process_info

        index, count = process_info()
        return (index if self.process_index is None else self.process_index,
                count if self.process_count is None else self.process_count)

    def local_batch_size(self, process_count: int) -> int:
        """The per-process batch; raises when the global batch does not divide."""
        if self.loader.batch_size % process_count:
            raise ConfigError(
                f"loader.batch_size {self.loader.batch_size} does not divide among "
                f"{process_count} processes; use a multiple of {process_count} (e.g. "
                f"{(self.loader.batch_size // process_count + 1) * process_count})"
            )
        return self.loader.batch_size // process_count

    def dataset_path(self) -> str:
        """The dataset location, writing the demo dataset first when ``data.path`` is demo."""
        d = self.data
        if d.path == DEMO and d.data_dir is None:
            from torch_rlds.synthetic import demo_dataset

            return os.fspath(demo_dataset())
        if d.data_dir is None and "/" not in d.path and not os.path.exists(d.path):
            raise ConfigError(f"data.path {d.path!r} is a dataset name: set data.data_dir to the "
                              "TFDS data directory that holds it (e.g. data.data_dir=/data), or "
                              "give data.path as a directory")
        return d.path

    def plan(self):
        """The :class:`torch_rlds._plan.EpisodePlan` of ``data.trajectory`` and
        ``data.filters`` (``None`` without either)."""
        d = self.data
        if d.trajectory is None and d.filters is None:
            return None
        from torch_rlds._plan import EpisodePlan
        from torch_rlds.keymap import key_map_from_config

        return EpisodePlan(key_map_from_config(d), d.trajectory, d.filters, seed=d.seed,
                           action_horizon=d.action_horizon)

    def make_dataset(self, process_index: int | None = None, process_count: int | None = None):
        """The :class:`torch_rlds.RLDSDataset` this config describes, for this process (a
        :class:`torch_rlds.MixtureDataset` when the config has a ``mixture``)."""
        from torch_rlds.dataset import RLDSDataset
        from torch_rlds.source import RLDSSource

        index, count = self.processes()
        index = index if process_index is None else process_index
        count = count if process_count is None else process_count
        if self.mixture is not None:
            from torch_rlds.mixture import MixtureDataset

            mixture = self.mixture
            children = [load_config(e.config, mixture.entry_overrides(e)).make_dataset(index,
                                                                                      count)
                        for e in mixture.datasets]
            sizes = None
            if mixture.balance == "steps":
                sizes = [_step_count(child, e.config)
                         for child, e in zip(children, mixture.datasets)]
            return MixtureDataset(children, [e.weight for e in mixture.datasets],
                                  seed=mixture.seed, balance=bool(mixture.balance),
                                  sizes=sizes)
        d = self.data
        source = RLDSSource(self.dataset_path(), d.split, data_dir=d.data_dir)
        transform = None
        if d.transform is not None:
            transform = d.transform.build(seed=d.seed, source=source, key_map=d.key_map,
                                          plan=self.plan())
        # Every data field that RLDSDataset takes goes to it by name (DATASET_FIELDS); the
        # rest of its arguments come from the process, the loader or the transform section.
        return RLDSDataset(
            source, **{name: getattr(d, name) for name in DATASET_FIELDS},
            process_index=index, process_count=count, sample_transform=transform,
            decode_sizes=(d.transform.decode_sizes(d.key_map, source)
                          if d.transform is not None else None),
        )

    def make_loader(self, process_index: int | None = None, process_count: int | None = None,
                    **kwargs: Any):
        """The :class:`torch_rlds.DataLoader` this config describes (local batch size)."""
        from torch_rlds.loader import DataLoader

        dataset = self.make_dataset(process_index, process_count)
        count = dataset.datasets[0].process_count if self.mixture else dataset.process_count
        # Never None once the section is built: __post_init__ puts the default in.
        workers = cast(int, self.loader.num_workers)
        options: dict[str, Any] = dict(
            batch_size=self.local_batch_size(count), num_workers=workers,
            snapshot_every_n_steps=self.loader.snapshot_every_n_steps,
        )
        if workers > 0:
            options.update(prefetch_factor=self.loader.prefetch_factor,
                           persistent_workers=self.loader.persistent_workers)
        options.update(kwargs)
        return DataLoader(dataset, **options)


_SECTIONS = {"data": DataConfig, "loader": LoaderConfig}


def format_config(config: Config) -> str:
    """``config`` as YAML that :func:`load_config` reads back, every field with a comment
    saying what it allows (what ``torch-rlds config`` prints)."""
    lines = [f"# config {config.name}, resolved: each field's value, and what it allows",
             f"name: {_yaml(config.name)}"]
    if config.process_index is not None or config.process_count is not None:
        lines += [f"process_index: {_yaml(config.process_index)}",
                  f"process_count: {_yaml(config.process_count)}"]
    if config.mixture is not None:
        lines += ["mixture:", f"  seed: {config.mixture.seed}",
                  f"  balance: {_yaml(config.mixture.balance)}",
                  f"  data_dir: {_yaml(config.mixture.data_dir)}", "  datasets:"]
        for entry in config.mixture.datasets:
            lines += [f"    - config: {_yaml(entry.config)}", f"      weight: {entry.weight}",
                      f"      overrides: {_yaml(list(entry.overrides))}"]
    else:
        lines += ["data:", *_section_lines(config.data, "  ")]
    lines += ["loader:", *_section_lines(config.loader, "  ")]
    return "\n".join(lines)


def _section_lines(section: Any, indent: str) -> list[str]:
    from torch_rlds._rules import describe

    rows: list[tuple[str, str | None]] = []
    for name, value, allowed, help in describe(section):
        if hasattr(value, "to_list"):  # data.trajectory: one entry a line
            rows.append((f"{indent}{name}:", f"{allowed}: {help}"))
            rows += [(f"{indent}  - {_yaml(entry, sort=False)}", None)
                     for entry in value.to_list()]
        elif hasattr(value, "to_dict"):  # a key map, data.filters
            rows.append((f"{indent}{name}:", f"{allowed}: {help}"))
            rows += [(f"{indent}  {k}: {_yaml(v, sort=False)}", None)
                     for k, v in value.to_dict().items()]
        elif dataclasses.is_dataclass(value):  # a nested section (data.transform)
            rows.append((f"{indent}{name}:", f"{allowed}: {help}"))
            rows += [(line, None) for line in _section_lines(value, indent + "  ")]
        else:
            rows.append((f"{indent}{name}: {_yaml(value)}", f"{allowed}: {help}"))
    width = max((len(text) for text, note in rows if note is not None), default=0)
    return [text if note is None else f"{text.ljust(width)}  # {note}" for text, note in rows]


def _yaml(value: Any, *, sort: bool = True) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000,
                          sort_keys=sort).strip().removesuffix("\n...").strip()


def config_names() -> list[str]:
    """Names of the configs shipped with torch_rlds."""
    files = importlib.resources.files("torch_rlds.configs")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> tuple[str, dict[str, Any]]:
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"config file {name_or_path} does not exist")
        with open(name_or_path) as f:
            text = f.read()
        name = os.path.splitext(os.path.basename(name_or_path))[0]
    else:
        resource = importlib.resources.files("torch_rlds.configs") / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ConfigError(f"no config named {name_or_path!r} (shipped configs: "
                              f"{config_names()}; or give a path to a .yaml file)")
        text = resource.read_text()
        name = name_or_path
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {name_or_path}: expected a mapping at the top level")
    return name, raw


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    parts = key.strip().split(".")
    tree = raw
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    tree[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping (got {raw!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown} (allowed: {sorted(fields)})")
    hints = get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key in _SECTIONS and cls is Config:
            values[key] = _build(_SECTIONS[key], value, key)
        elif key == "mixture" and cls is Config and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"mixture must be a mapping (got {value!r})")
            try:
                values[key] = MixtureConfig(**value)
            except TypeError as e:
                raise ConfigError(f"mixture: {e}") from e
        elif isinstance(value, list) and "tuple" in str(hints.get(key, "")):
            values[key] = tuple(value)
        else:
            values[key] = value
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _step_count(dataset: Any, name: str) -> int:
    """The steps ``dataset`` samples per epoch, for ``mixture.balance: steps``."""
    try:
        return int(dataset.num_steps)
    except (AttributeError, ValueError):
        pass
    source = dataset.source
    if source.info.file_format != "tfrecord":
        raise ConfigError(f"mixture.balance: steps: {name} ({source.info.path}) holds "
                          f"{source.info.file_format} shards, whose steps are not counted; "
                          "balance by episodes")
    from torch_rlds._step_reader import StepFiles

    return int(StepFiles(source).lengths().clip(min=0).sum())


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Load a shipped config by name (``demo``) or a YAML file by path, then apply
    ``key=value`` overrides (``data.seed=3``, ``loader.batch_size=64``)."""
    name, raw = _read_yaml(name_or_path)
    raw = dict(raw)
    raw.setdefault("name", name)
    for override in overrides:
        _apply_override(raw, override)
    return _build(Config, raw, f"config {name}")
