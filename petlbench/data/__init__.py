"""petlbench's data layer: suites as YAML, readers for the layouts users already have, a
decode-once cache, a device-side loader, fingerprints, ``data check`` and the offline demo.

Typical use by the runner::

    suite = get_suite("vtab")
    task = suite.resolve_task("cifar100")            # aliases resolve to "cifar"
    root = resolve_data_root(suite, data_root)       # builds the demo data when needed
    check_suite(suite, root, [task.name]).raise_for_errors()
    index = read_split(suite, task, suite.split_for("train"), root)
    cached = load_images(index, transform_spec(suite))
    loader = DeviceLoader.for_split(cached, train=True, batch_size=64,
                                    normalization=resolve_normalization(mean=m, std=s),
                                    seed=seed, device="cuda")
    fingerprint = fingerprint_split(index)

Modules import one way, from the leaves up: ``problems``, ``paths``, ``transforms`` and ``suites``;
then ``readers`` (split files); ``fingerprint``; ``cache`` (decoding); ``loader``; ``demo`` (builds
the demo data) and ``demo_pretrain`` (made the shipped demo weights, through the loader); ``roots`` (``--data-root`` or the demo's data); ``check``
and ``cli`` on top. ``tests/test_import_layers.py`` keeps it so.

Names are imported lazily, so ``import petlbench.data`` (and the ``data`` CLI) does not pay
for torch until a torch-backed name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from petlbench._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # suites
    "Suite": "suites", "Task": "suites", "get_suite": "suites", "list_suites": "suites",
    "load_suite_file": "suites", "load_suites": "suites", "SUITE_PATH_ENV": "suites",
    "ENTRY_POINT_GROUP": "suites",
    # problems
    "DataError": "problems", "Problem": "problems",
    # readers
    "SplitIndex": "readers", "read_split": "readers", "collect_split": "readers",
    "find_task_dir": "readers", "resolve_data_root": "roots", "concat_splits": "readers",
    "train_val_splits": "readers",
    # transforms
    "Normalization": "transforms", "NORMALIZATIONS": "transforms", "resolve_normalization": "transforms",
    "TransformSpec": "transforms", "transform_spec": "transforms", "reference_transform": "transforms",
    "decode_image": "transforms", "input_spec": "transforms", "Storage": "transforms",
    # cache + loader (torch)
    "CachedSplit": "cache", "load_images": "cache", "load_split": "cache", "cache_key": "cache",
    "cache_root": "paths", "CACHE_ENV": "paths", "DeviceLoader": "loader",
    # fingerprints
    "fingerprint_split": "fingerprint", "cached_fingerprint": "fingerprint", "fingerprint_task": "fingerprint", "combine_fingerprints": "fingerprint",
    # check
    "check_suite": "check", "CheckReport": "check",
    # demo
    "materialize_demo": "demo", "demo_backbone": "demo", "demo_weights": "demo",
}

# Listed out (not derived from _EXPORTS) so linters and IDEs can check the names.
__all__ = [
    "CACHE_ENV", "CachedSplit", "CheckReport", "DataError", "DeviceLoader", "ENTRY_POINT_GROUP",
    "NORMALIZATIONS", "Normalization", "Problem", "SUITE_PATH_ENV", "SplitIndex", "Storage", "Suite", "Task",
    "TransformSpec", "cache_key", "cache_root", "check_suite", "collect_split", "combine_fingerprints",
    "cached_fingerprint", "concat_splits", "decode_image", "demo_backbone", "demo_weights", "find_task_dir",
    "fingerprint_split", "fingerprint_task", "get_suite", "input_spec", "list_suites", "load_images", "load_split",
    "load_suite_file", "load_suites", "materialize_demo", "read_split", "reference_transform", "resolve_data_root",
    "resolve_normalization", "train_val_splits", "transform_spec",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from petlbench.data.cache import CachedSplit, cache_key, load_images, load_split
    from petlbench.data.check import CheckReport, check_suite
    from petlbench.data.demo import demo_backbone, demo_weights, materialize_demo
    from petlbench.data.fingerprint import (
        cached_fingerprint,
        combine_fingerprints,
        fingerprint_split,
        fingerprint_task,
    )
    from petlbench.data.loader import DeviceLoader
    from petlbench.data.paths import CACHE_ENV, cache_root
    from petlbench.data.problems import DataError, Problem
    from petlbench.data.readers import (
        SplitIndex,
        collect_split,
        concat_splits,
        find_task_dir,
        read_split,
        train_val_splits,
    )
    from petlbench.data.roots import resolve_data_root
    from petlbench.data.suites import (
        ENTRY_POINT_GROUP,
        SUITE_PATH_ENV,
        Suite,
        Task,
        get_suite,
        list_suites,
        load_suite_file,
        load_suites,
    )
    from petlbench.data.transforms import (
        NORMALIZATIONS,
        Normalization,
        Storage,
        TransformSpec,
        decode_image,
        input_spec,
        reference_transform,
        resolve_normalization,
        transform_spec,
    )
