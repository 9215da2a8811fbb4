"""Datasets for CPSL: label protocols, the dataset registry (:func:`load_dataset` reads any dataset by name),
GTA5 / SYNTHIA / Cityscapes readers, class tables and your own folders (``load_folder``), the ACDC / Dark Zurich /
BDD100K / Mapillary readers, prepared (parquet, Hub) datasets, the built-in synthetic domain shift,
streaming loaders and weak/strong augmentation.

Names are resolved lazily so that ``import cpsl_hf.data`` stays cheap (``datasets`` is imported only when
a reader is used).
"""

from cpsl_hf._lazy import lazy_getattr

_EXPORTS = {
    # label protocols
    "CITYSCAPES_CLASSES": "protocols",
    "CITYSCAPES_PALETTE": "protocols",
    "class_names": "protocols",
    "palette": "protocols",
    "protocol_train_ids": "protocols",
    "IGNORE_INDEX": "protocols",
    "THIRTEEN_OF_SIXTEEN": "protocols",
    "label_id_lut": "protocols",
    "synthia_lut": "protocols",
    "train_id_to_label_id": "protocols",
    "colorize": "protocols",
    # class tables: any class set
    "ClassTable": "class_table",
    "ClassTableError": "class_table",
    "ClassMapping": "class_table",
    "load_class_table": "class_table",
    "map_class_tables": "class_table",
    "protocol_table": "class_table",
    "distinct_palette": "class_table",
    # the dataset registry: every dataset by name
    "DatasetSpec": "registry",
    "DATASET_SPECS": "registry",
    "DATASETS": "registry",
    "TRAINING_DATASETS": "registry",
    "DOWNLOADS": "registry",
    "SYNTHETIC_OPTIONS": "registry",
    "dataset_spec": "registry",
    "dataset_kind": "registry",
    "load_dataset": "registry",
    # readers
    "load_gta5": "readers",
    "load_synthia": "readers",
    "load_cityscapes": "readers",
    "load_prepared": "readers",
    "load_folder": "folder",
    "load_acdc": "benchmarks",
    "load_dark_zurich": "benchmarks",
    "load_bdd100k": "benchmarks",
    "load_mapillary": "benchmarks",
    "BadSampleError": "readers",
    "BadSample": "readers",
    "DataReport": "readers",
    "LayoutError": "readers",
    "HubDatasetError": "readers",
    "prepare_dataset": "prepare",
    "EndlessLoader": "loading",
    # the built-in synthetic domain shift
    "load_synthetic": "synthetic",
    "generate_synthetic": "synthetic",
    # loaders
    "build_train_loader": "loading",
    "build_eval_loader": "loading",
    # augmentation
    "weak_augment": "transforms",
    "strong_augment": "transforms",
    "warp_to_view": "transforms",
    "normalize": "transforms",
    "to_float": "transforms",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "class_mix": "transforms",
    "cut_mix": "transforms",
    "apply_mix_mask": "transforms",
    "compose": "transforms",
    "identity_params": "transforms",
    "WeakView": "transforms",
    "StrongView": "transforms",
    "WeakParams": "transforms",
    "StrongParams": "transforms",
    "ViewGeometry": "transforms",
    "MixResult": "transforms",
    "RANDAUGMENT_OPS": "transforms",
    "GEOMETRIC_OPS": "transforms",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
