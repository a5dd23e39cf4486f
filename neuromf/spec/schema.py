"""The run-spec: one typed, validated description of a training run.

Every section is a pydantic model that rejects unknown keys. Defaults are the
values explained in docs/design.md, 'Decisions'. Cross-field checks live beside the fields they relate,
so a user learns about an impossible run in `neuromf validate`, not hours into
a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neuromf.spec.kinds import type_problem

# MAISI's MR VAE scales latents by this factor before the diffusion model sees them.
MAISI_SCALE_FACTOR = 0.96240234375


NOISE_BYTES_LIMIT = 2 * 2**30  # sampling.n_samples: the fixed noise and its samples are held at once


class Section(BaseModel):
    """Base of every run-spec section: unknown keys are errors, assignments are checked, floats are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_kinds(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                problem = type_problem(name, field.annotation, value) if field is not None else None
                if problem:
                    raise ValueError(problem)
        return data


class ModelSpec(Section):
    """The MAISI 3D diffusion UNet with a second time embedding for h = t - r."""

    architecture: Literal["maisi_3d_unet"] = "maisi_3d_unet"
    in_channels: int = Field(4, ge=1, description="Latent channels in.")
    out_channels: int = Field(4, ge=1, description="Latent channels out.")
    spatial_size: tuple[int, int, int] = Field(
        (48, 48, 48), description="Latent spatial shape (D, H, W) the network is built for."
    )
    channels: list[int] = Field([64, 128, 256, 512], min_length=1, description="Channels per UNet level.")
    attention_levels: list[bool] = Field(
        [False, False, True, True], description="Self-attention on each level (one entry per level)."
    )
    num_head_channels: list[int] = Field(
        [0, 0, 32, 32], description="Channels per attention head on each level (0 where no attention)."
    )
    num_res_blocks: int = Field(2, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    resblock_updown: bool = True
    prediction_type: Literal["x", "u"] = Field(
        "x", description="x: the network predicts the clean latent (iMF default); u: the average velocity (ablation)."
    )
    time_scale: float = Field(
        1.0,
        gt=0,
        description="t and h are multiplied by this before the sinusoidal embedding. 1.0 (raw t in [0, 1]) as the "
        "official MeanFlow code; 1000 matches the pretrained NV-Generate-MR UNet (required with init_from).",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Must stay 0: MONAI's MAISI UNet has dropout only on cross-attention layers, "
        "which this unconditional network does not have.",
    )
    init_from: Path | None = Field(
        None, description="Warm start: NV-Generate-MR rectified-flow UNet checkpoint (diff_unet_3d_rflow-mr.pt)."
    )
    init_class_label: int = Field(
        9,
        ge=0,
        description="Warm start: the NV-Generate-MR modality class folded into the time embedding "
        "(NVIDIA's modality_mapping.json: 9 = mri_t1, 29 = mri_t1_skull_stripped).",
    )
    init_spacing_mm: tuple[float, float, float] = Field(
        (1.0, 1.0, 1.0), description="Warm start: voxel spacing (mm) of the decoded volumes, folded into biases."
    )

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def downsampling(self) -> int:
        """Total spatial downsampling factor of the UNet (one halving between levels)."""
        return 2 ** (len(self.channels) - 1)

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelSpec:
        n = len(self.channels)
        if len(self.attention_levels) != n:
            raise ValueError(
                f"attention_levels: has {len(self.attention_levels)} entries but channels has {n}; give one per level"
            )
        if len(self.num_head_channels) != n:
            raise ValueError(
                f"num_head_channels: has {len(self.num_head_channels)} entries but channels has {n}; give one per level"
            )
        for i, c in enumerate(self.channels):
            if c % self.norm_num_groups:
                raise ValueError(
                    f"channels: {c} (level {i}) is not divisible by norm_num_groups = {self.norm_num_groups}"
                )
        for i, (attn, head) in enumerate(zip(self.attention_levels, self.num_head_channels)):
            if attn and head <= 0:
                raise ValueError(f"num_head_channels: level {i} has attention, so its head channels must be > 0")
            if attn and self.channels[i] % head:
                raise ValueError(
                    f"num_head_channels: channels {self.channels[i]} of level {i} is not divisible by {head}"
                )
        if self.num_head_channels[-1] <= 0 or self.channels[-1] % self.num_head_channels[-1]:
            # MONAI's middle block always has self-attention, with the last level's head channels.
            raise ValueError(
                f"num_head_channels: the last level's entry ({self.num_head_channels[-1]}) must be > 0 "
                f"and divide its channels ({self.channels[-1]}): the middle block always has attention"
            )
        for axis, size in zip("DHW", self.spatial_size):
            if size < 1 or size % self.downsampling:
                raise ValueError(
                    f"spatial_size: {list(self.spatial_size)} has {axis} = {size}, not divisible by the UNet's total "
                    f"downsampling {self.downsampling} (2^(levels - 1) for {n} levels)"
                )
        for i, c in enumerate(self.channels):
            if c == self.norm_num_groups:
                # A ResBlock adds t and h as a per-channel bias, then GroupNorm subtracts each group's mean: with one
                # channel per group that removes the bias whole, so the level's blocks never see t or h.
                raise ValueError(
                    f"norm_num_groups: {c} groups for the {c} channels of level {i} is one channel per group, which "
                    "removes the time conditioning there (GroupNorm subtracts the per-channel t/h bias); use fewer "
                    "groups than the channels of every level"
                )
        if self.init_from is not None and self.time_scale != 1000.0:
            raise ValueError(
                "time_scale: must be 1000 with init_from (the pretrained NV-Generate-MR UNet embeds t in 0..1000)"
            )
        return self


class MeanFlowSpec(Section):
    """The iMF loss (docs/design.md, 'The method')."""

    denominator_floor: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Floor of t in u = (z_t - x_hat) / max(t, denominator_floor), in training and in "
        "multi-step sampling (formerly meanflow.t_min; unrelated to time_sampling.t_min).",
    )
    norm_eps: float = Field(0.01, gt=0, description="Adaptive weight w = 1 / (l + norm_eps)^norm_p.")
    loss_norm: float = Field(2.0, gt=0, description="p in the per-sample loss sum |Delta|^p.")
    norm_p: float = Field(1.0, ge=0, description="Power of the adaptive weight (0 turns it off).")
    lambda_mf: float = Field(1.0, ge=0, description="loss_total = L_FM + lambda_mf * L_MF.")


class TimeSamplingSpec(Section):
    """(t, r) pairs: logit-normal, t = max, r = min, first block has r = t."""

    distribution: Literal["logit_normal"] = "logit_normal"
    mu: float = -0.4
    sigma: float = Field(1.0, gt=0)
    t_min: float = Field(0.001, gt=0, lt=1, description="Floor of the sampled times.")
    data_proportion: float = Field(
        0.25, ge=0, le=1, description="The first floor(B * data_proportion) samples of a batch get r = t."
    )


class TrainingSpec(Section):
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "constant"] = Field("cosine", description="After warmup: cosine decay or constant.")
    warmup_steps: int = Field(5000, ge=0, description="Linear warmup, in optimizer steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    max_epochs: int = Field(500, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(
        24,
        ge=1,
        description="Latents per optimizer step, all micro-batches of all GPUs together "
        "(the global batch; each GPU gets batch_size / GPUs).",
    )
    accumulate_grad_batches: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="Network autocast dtype. fp16 is not offered: it gives NaN."
    )
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (None: no clipping).")
    compile: bool = Field(True, description="torch.compile the training step (falls back to eager if it fails).")
    fold_zero_tangents: bool = Field(
        True,
        description="With compile: drop the JVP's convolutions/matmuls with an "
        "all-zero weight tangent (exact; a third of the JVP's FLOPs). Off only to debug.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = Field(
        "default",
        description="torch.compile mode of the step: reduce-overhead replays it as CUDA graphs (GPU); "
        "max-autotune* benchmark kernels while compiling (slower compile).",
    )
    gradient_checkpointing: bool = Field(False, description="Checkpoint activations of the gradient pass.")
    seed: int = 42
    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms (slower; for exact resume tests)."
    )
    max_bad_steps: int = Field(
        10, ge=1, description="Stop after this many consecutive steps with NaN/Inf loss or grads."
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp16(cls, v: object) -> object:
        if isinstance(v, str) and v.lower() in {"fp16", "16", "16-mixed", "float16", "half"}:
            raise ValueError("fp16 gives NaN with the JVP loss: use bf16 (or fp32)")
        if isinstance(v, str) and v.lower() in {"bf16-mixed", "bfloat16"}:
            return "bf16"
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check_batching(self) -> TrainingSpec:
        if self.batch_size % self.accumulate_grad_batches:
            raise ValueError(
                f"batch_size: {self.batch_size} is not divisible by accumulate_grad_batches "
                f"{self.accumulate_grad_batches}: each micro-batch must have the same size"
            )
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be shorter than max_steps {self.max_steps}")
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.accumulate_grad_batches

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: max_steps when set, else max_epochs epochs."""
        return self.max_steps or steps_per_epoch * self.max_epochs


class EMASpec(Section):
    decay: float = Field(0.999, gt=0, lt=1, description="Simple exponential moving average of the weights.")
    half_lives: list[int] | None = Field(
        None,
        description="Optional extra EMAs, one per half-life h in optimizer steps (decay 0.5^(1/h)), for ablations; validation and samples use the main EMA.",
    )
    update_every: int = Field(1, ge=1)

    @field_validator("half_lives")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(h <= 0 for h in v):
            raise ValueError("every half-life must be > 0 steps")
        return v


class DemoDataSpec(Section):
    """The embedded demo set, built from the MNI152 template that nilearn ships."""

    n_volumes: int = Field(128, ge=4)
    size: int | None = Field(
        None, ge=8, description="Cube side of the demo volumes (default: model.spatial_size, which must be a cube)."
    )
    seed: int = 0


class DataSpec(Section):
    source: Literal["shard", "folder", "demo"] = Field(
        "shard",
        description="shard: the HDF5 shard (packed from latent_dir when missing or stale); folder: read the .pt files "
        "directly; demo: build the embedded demo set into the run folder if absent, then use it as a shard.",
    )
    latent_dir: Path | None = Field(
        None, description="Folder of latents: .pt files, the upstream encoder's per-dataset .h5 shards, or both."
    )
    shard: Path | None = Field(None, description="HDF5 shard (default: <run_dir>/data/latents.h5).")
    stats: Literal["shard", "file"] = Field(
        "shard", description="Normalisation statistics from the shard's attributes or from latent_stats.json."
    )
    stats_file: Path | None = Field(None, description="latent_stats.json (default: <latent_dir>/latent_stats.json).")
    stats_mismatch: Literal["refuse", "warn"] = Field(
        "refuse",
        description="With stats 'file': refuse to train when latent_stats.json's mean or std is off by more "
        "than 10 % of the data's channel std (warn: train anyway). Smaller disagreements (> 2 %) are always warned.",
    )
    normalise: bool = True
    val_fraction: float = Field(0.10, ge=0, lt=1, description="Share of subjects (not files) held out for validation.")
    test_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of subjects held out for testing (neuromf evaluate)."
    )
    split_seed: int = 42
    subject_from: str = Field(
        "metadata",
        description="The subject key of the split: 'metadata' (the sources' subject ids; names without "
        "them are parsed as {dataset}_{subject}_{session}) or a regular expression on the latent name with a "
        "(?P<subject>...) group (and optionally (?P<dataset>...)). Names that match nothing are their own subject.",
    )
    residency: Literal["auto", "device", "host", "stream"] = Field(
        "auto", description="Where the training set lives: on the GPU, in host memory, or streamed from the shard."
    )
    flip_lr: bool = Field(False, description="Augment with random left-right flips of the latent volume.")
    flip_axis: int = Field(
        0, ge=0, le=2, description="Spatial axis flipped by flip_lr: 0 (D) is left-right for RAS-ordered latents."
    )
    demo: DemoDataSpec = DemoDataSpec()

    @model_validator(mode="after")
    def _check_source(self) -> DataSpec:
        if self.source == "folder" and self.latent_dir is None:
            raise ValueError("latent_dir: required when source is 'folder'")
        if self.source == "shard" and self.latent_dir is None and self.shard is None:
            raise ValueError("shard: source 'shard' needs shard or latent_dir (to pack the shard from)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"test_fraction: val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves no training subjects (must be < 1)"
            )
        if self.subject_from != "metadata":
            import re

            try:
                rx = re.compile(self.subject_from)
            except re.error as e:
                raise ValueError(f"subject_from: not a regular expression ({e})") from None
            if "subject" not in rx.groupindex:
                raise ValueError("subject_from: the regular expression needs a (?P<subject>...) group")
        return self


class HardwareSpec(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nodes: int = Field(
        1, ge=1, description="Nodes of a multi-GPU run (one process per GPU, launched by srun or torchrun)."
    )
    gpus_per_node: int = Field(
        1, ge=1, description="GPUs (= processes) per node; training.batch_size stays the global batch."
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="CPU threads for torch (None: torch's default, one per core: fastest on idle "
        "cores, but CPU training collapses when another process takes a core; the CPU demo sets 1).",
    )
    collective_timeout_s: int = Field(
        1800,
        ge=10,
        description="Multi-process runs: how long a rank waits for the others in a collective "
        "(gradient all-reduce, barrier) before failing with an error instead of hanging.",
    )


class PathsSpec(Section):
    """Where things are. Any `${paths.KEY}` in the spec refers to these, `${NAME}` to the environment."""

    run_dir: Path = Field(Path("runs/run"), description="Everything a run writes goes here.")
    results_root: Path | None = None
    checkpoints_root: Path | None = None
    vae_weights: Path | None = Field(None, description="MAISI VAE weights (autoencoder_v2.pt) for decoding samples.")
    cache_dir: Path | None = Field(None, description="torch.compile cache (TORCHINDUCTOR_CACHE_DIR).")


class CheckpointSpec(Section):
    save_every_n_epochs: int = Field(50, ge=1)
    latest_every_n_steps: int = Field(500, ge=1, description="Overwrite checkpoints/latest.pt this often.")
    keep_last: int = Field(3, ge=1, description="Periodic (epoch) checkpoints kept.")


class LoggingSpec(Section):
    log_every_n_steps: int = Field(50, ge=1)
    val_every_n_epochs: int = Field(10, ge=1)
    progress: Literal["auto", "bar", "plain"] = Field("auto", description="auto: a bar on a terminal, lines otherwise.")
    wandb: bool = False
    wandb_project: str = "neuromf"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


class VAESpec(Section):
    """The frozen MAISI VAE (NV-Generate-MR) that decodes sample latents."""

    decoder: Literal["maisi", "identity"] = Field("maisi", description="identity: show latents as they are (demo).")
    num_channels: list[int] = [64, 128, 256]
    num_res_blocks: list[int] = [2, 2, 2]
    latent_channels: int = 4
    norm_num_groups: int = 32
    scale_factor: float = Field(MAISI_SCALE_FACTOR, gt=0)
    num_splits: int = Field(1, ge=1, description="Split the decode to save memory (MAISI's num_splits).")

    @model_validator(mode="after")
    def _lists_agree(self) -> VAESpec:
        if len(self.num_channels) != len(self.num_res_blocks):
            raise ValueError(
                f"num_res_blocks: has {len(self.num_res_blocks)} entries but num_channels has {len(self.num_channels)}"
            )
        return self


class SamplingSpec(Section):
    """Periodic samples during training."""

    every_n_epochs: int = Field(25, ge=1)
    n_samples: int = Field(8, ge=1)
    seed: int = Field(0, description="Seed of the fixed noise, so samples of different epochs are comparable.")
    nfe: list[int] = Field([1], min_length=1, description="Numbers of steps to sample with (1 = one-step).")
    weights: list[Literal["ema", "online"]] = Field(["ema"], min_length=1)
    save_volumes: bool = Field(True, description="Also write decoded volumes as NIfTI.")

    @field_validator("nfe")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("every NFE must be >= 1")
        return v


class EvaluationSpec(Section):
    """How `neuromf evaluate`, `neuromf verify` and periodic evaluation compare samples with real data."""

    features: Literal["pooled", "medicalnet3d", "radimagenet2p5d"] = Field(
        "pooled",
        description="pooled: weight-free pooled statistics (not comparable with papers); medicalnet3d: a MedicalNet 3D "
        "ResNet (FID on whole volumes); radimagenet2p5d: RadImageNet ResNet50 on axial, coronal and sagittal slices (MAISI's 2.5D FID).",
    )
    weights: Path | None = Field(
        None, description="The extractor's weights file (staged by the user; never downloaded)."
    )
    space: Literal["image", "latent"] | None = Field(
        None,
        description="image: decode samples and reference latents with the VAE first; latent: compare latents "
        "(pooled only). Default: image for the extractors, latent for pooled.",
    )
    n: int | None = Field(None, ge=2, description="Samples and reference volumes (default: min(500, reference split)).")
    diversity_samples: int = Field(16, ge=2, description="Volumes per set for the mean pairwise MS-SSIM (all pairs).")
    every_n_epochs: int | None = Field(
        None, ge=1, description="Periodic small-N FID of the EMA weights during training (off: None)."
    )
    periodic_n: int = Field(16, ge=2, description="Samples and reference volumes of the periodic evaluation.")

    @property
    def resolved_space(self) -> Literal["image", "latent"]:
        return self.space or ("latent" if self.features == "pooled" else "image")

    @model_validator(mode="after")
    def _check_extractor(self) -> EvaluationSpec:
        if self.features != "pooled" and self.weights is None:
            raise ValueError(
                f"weights: required with features {self.features} (the file is staged by you; nothing is downloaded)"
            )
        if self.features != "pooled" and self.space == "latent":
            raise ValueError(f"space: {self.features} works on decoded images; use space image (or features pooled)")
        return self


class RunSpec(Section):
    """A whole training run."""

    name: str = Field("neuromf", description="Run name (wandb, logs).")
    model: ModelSpec = ModelSpec()
    meanflow: MeanFlowSpec = MeanFlowSpec()
    time_sampling: TimeSamplingSpec = TimeSamplingSpec()
    training: TrainingSpec = TrainingSpec()
    ema: EMASpec = EMASpec()
    data: DataSpec = DataSpec(source="demo")
    hardware: HardwareSpec = HardwareSpec()
    paths: PathsSpec = PathsSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    logging: LoggingSpec = LoggingSpec()
    vae: VAESpec = VAESpec()
    sampling: SamplingSpec = SamplingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()

    @model_validator(mode="after")
    def _check_cross_sections(self) -> RunSpec:
        if self.vae.latent_channels != self.model.in_channels and self.vae.decoder == "maisi":
            raise ValueError(
                f"vae.latent_channels: {self.vae.latent_channels} differs from model.in_channels {self.model.in_channels}"
            )
        if self.model.in_channels != self.model.out_channels:
            raise ValueError("model.out_channels: must equal model.in_channels (the network predicts a latent)")
        if self.data.source == "demo" and self.data.demo.size is None:
            side = self.model.spatial_size[0]
            if self.model.spatial_size != (side,) * 3:
                raise ValueError(f"model.spatial_size: the demo volumes are cubes, got {list(self.model.spatial_size)}")
            self.data.demo.size = side
        if self.data.source == "demo" and self.model.spatial_size != (self.data.demo.size,) * 3:
            raise ValueError(
                f"model.spatial_size: {list(self.model.spatial_size)} differs from the demo volumes' size "
                f"{self.data.demo.size} (data.demo.size)"
            )
        noise_bytes = self.sampling.n_samples * self.model.in_channels * 4
        for size in self.model.spatial_size:
            noise_bytes *= size
        if noise_bytes > NOISE_BYTES_LIMIT:
            raise ValueError(
                f"sampling.n_samples: {self.sampling.n_samples} samples of {self.model.in_channels} x "
                f"{list(self.model.spatial_size)} need {noise_bytes / 2**30:.1f} GiB for the noise alone "
                f"(at most {NOISE_BYTES_LIMIT // 2**30} GiB)"
            )
        if self.data.source == "demo" and self.model.in_channels != 4:
            raise ValueError("model.in_channels: the demo data has 4 channels")
        if self.hardware.device == "cpu" and self.training.precision == "bf16":
            raise ValueError(
                "training.precision: bf16 on hardware.device cpu gives sporadic NaN gradients "
                "(PyTorch's CPU bf16 3D convolutions); use fp32 on CPU"
            )
        if self.training.micro_batch_size < 1:
            raise ValueError("training.batch_size: must be >= accumulate_grad_batches")
        gpus = self.hardware.nodes * self.hardware.gpus_per_node
        if self.training.batch_size % (gpus * self.training.accumulate_grad_batches):
            raise ValueError(
                f"training.batch_size: {self.training.batch_size} (the global batch) is not divisible by "
                f"{gpus} GPU(s) x accumulate_grad_batches {self.training.accumulate_grad_batches}"
            )
        return self
