"""Typed run configuration: one frozen dataclass per concern, validated before any training.

Everything a run does is decided here. `Config.to_dict()` is what goes into every checkpoint and into
MLflow params; `Config.from_dict()` reads it back; `override(cfg, {"optim.lr": 3e-4})` is the one
override path (presets, sweep spaces, trial configs) and `apply_overrides(cfg, ["optim.lr=3e-4"])` the
`--set` of every job (both in overrides.py, re-exported here). Invariants are checked in
`__post_init__` with messages that say what to change,
including the ones the paper's code silently accepts (ALGORITHM §2.2: a batch too small for the
bootstrap layout quietly trains a single step size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

# The override path (and the error type) lives in overrides.py; importable from here as well.
from .batch_layout import suggest_global_batch, validate_bootstrap_layout, validate_reflow_layout
from .overrides import ConfigError, apply_overrides, check, coerce, field_type, from_dict, override, parse_overrides, \
    parse_value

REEXPORTED = (apply_overrides, coerce, field_type, override, parse_overrides, parse_value)


_RUN_NAME = re.compile(r"[A-Za-z0-9_.=+-]+")


@dataclass(frozen=True)
class ModelConfig:
    """Shortcut DiT shape (ALGORITHM §1). Image side/channels/classes come from DataConfig."""

    hidden_size: int = 384
    """Transformer width (DiT-S: 384, B: 768, L: 1024, XL: 1152)."""
    depth: int = 12
    """Number of adaLN DiT blocks."""
    num_heads: int = 6
    """Attention heads; head dim = hidden_size / num_heads; logits are scaled by 1/head_dim (§1.1)."""
    patch_size: int = 2
    """Patch side; the input side must be divisible by it."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of hidden_size."""
    zero_block_adaln: bool = False
    """Ablation: zero-init every block's adaLN (standard DiT). Official shortcut code: False (§1.2)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "depth", "num_heads", "patch_size"):
            check(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        check(self.hidden_size % self.num_heads == 0,
               f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        check(self.hidden_size % 4 == 0,
               f"model.hidden_size ({self.hidden_size}) must be divisible by 4 for the 2-D sin-cos positions")
        check(self.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Training objective (ALGORITHM §2, §6.1, §10)."""

    train_type: str = "shortcut"
    """One of objectives.registry.names(): shortcut, flow_matching, consistency, consistency_distillation,
    progressive, live_reflow, reflow (paired data), diffusion; the paper code's names naive / livereflow /
    consistency-distillation are accepted and normalised."""
    denoise_timesteps: int = 128
    """M: finest discretisation; fixes the flow t-grid, base level log2 M and the largest N (§4)."""
    bootstrap_every: int = 8
    """1/bootstrap_every of the global batch are self-consistency rows (B_b = B // bootstrap_every)."""
    bootstrap_ema: bool = True
    """Bootstrap targets from the EMA network (True, official) or the online one."""
    bootstrap_dt_bias: int = 0
    """0: levels L-1..0 laid out evenly; 1: favour big steps (§2.2)."""
    bootstrap_cfg: bool = False
    """Distil classifier-free guidance into the shortcut levels through the first n_cfg rows (§2.5)."""
    cfg_scale: float = 1.5
    """Guidance weight w used by bootstrap CFG (and the 'cfg' eval entry)."""
    class_dropout_prob: float = 0.1
    """Probability of replacing a flow row's label by the null id (flow rows only, §2.6)."""
    class_conditional: bool = True
    """False: every label is the null id (the unconditional CelebA recipe)."""
    clip_bootstrap: float = 4.0
    """Clip of the intermediate x' and of the bootstrap target (§2.5)."""
    eps: float = 1e-5
    """sigma_min of x_t = (1-(1-eps)t) x0 + t x1."""
    teacher_checkpoint: str = ""
    """Distillation teacher (consistency_distillation, progressive; ALGORITHM §6.3, §6.4): a checkpoint
    directory of a flow-matching run (local path or gs://.../checkpoint_NNNNNNN) with the same model
    shape, image size, channels and classes. The student also starts from it (params + EMA, fresh
    optimiser, step 0). Checked on the driver by teacher.check_teacher; must be empty for other methods."""
    sampler: str = "euler"
    """Consistency models only (§6.2): 'euler' (the official eval code) or 'multistep' (consistency
    sampling: jump to x1_hat, re-noise to the next t). Other train types sample with their own rule."""

    def __post_init__(self) -> None:
        from .objectives.registry import canonical  # torch-free: the registry is the only list of names

        try:
            object.__setattr__(self, "train_type", canonical(self.train_type))  # aliases -> canonical name
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check(self.sampler in ("euler", "multistep"),
               f"objective.sampler must be 'euler' or 'multistep', got {self.sampler!r}")
        m = self.denoise_timesteps
        check(m >= 2 and (m & (m - 1)) == 0,
               f"objective.denoise_timesteps must be a power of two >= 2 (e.g. 128), got {m}")
        check(self.bootstrap_every >= 1, f"objective.bootstrap_every must be >= 1, got {self.bootstrap_every}")
        check(self.bootstrap_dt_bias in (0, 1),
               f"objective.bootstrap_dt_bias must be 0 or 1, got {self.bootstrap_dt_bias}")
        check(0.0 <= self.class_dropout_prob <= 1.0,
               f"objective.class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}")
        check(self.clip_bootstrap > 0, f"objective.clip_bootstrap must be > 0, got {self.clip_bootstrap}")
        check(0 <= self.eps < 1, f"objective.eps must be in [0, 1), got {self.eps}")

    @property
    def num_levels(self) -> int:
        """L = log2(M): the flow-matching base level; bootstrap levels are 0..L-1."""
        return int(math.log2(self.denoise_timesteps))


@dataclass(frozen=True)
class OptimConfig:
    """AdamW defaults of ALGORITHM §3.1: constant lr, decoupled wd 0.1 on every parameter, no clip."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled, applied to every parameter (no exclusions), as optax.adamw."""
    warmup_steps: int = 0
    """Linear warm-up steps (official runs: 0)."""
    schedule: str = "constant"
    """'constant' (official) or 'cosine' (decays to 0 at train.max_steps after warm-up)."""
    grad_clip: float = 0.0
    """Global grad-norm clip; <= 0 disables (official: none)."""

    def __post_init__(self) -> None:
        check(math.isfinite(self.lr) and self.lr > 0, f"optim.lr must be a finite number > 0, got {self.lr}")
        check(math.isfinite(self.grad_clip), f"optim.grad_clip must be finite (<= 0 disables), got {self.grad_clip}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.schedule in ("constant", "cosine"),
               f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the online weights, updated after every optimiser step (ALGORITHM §3.2)."""

    decay: float = 0.999
    """theta_ema <- decay * theta_ema + (1 - decay) * theta."""
    eval_with_ema: bool = False
    """Sample / compute FID with the EMA weights (official default: online weights)."""

    def __post_init__(self) -> None:
        check(0.0 <= self.decay < 1.0, f"ema.decay must be in [0, 1), got {self.decay}")


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from and what they look like (after decoding)."""

    source: str = "digits"
    """'digits' (scikit-learn's bundled set, written to Parquet shards on first use), 'parquet'
    (shards written by jobs.prepare_data), or 'fashion_mnist' (IDX files at `uri`)."""
    uri: str = ""
    """Dataset location: a directory/prefix of Parquet shards (local path, gs://, any fsspec URI), or
    for fashion_mnist the folder/URL of the IDX files. Empty for digits: a cache dir is used."""
    image_size: int = 16
    """Side of the square model input (pixels, or latent side for latent datasets)."""
    channels: int = 1
    """Channels of the model input (1 grayscale, 3 RGB, 4 SD-VAE latents)."""
    num_classes: int = 10
    """Number of real classes; the null (CFG) label is num_classes."""
    kind: str = "pixels"
    """'pixels' (images in [-1, 1]) or 'latents' (VAE posterior mean/logvar, sampled each step)."""
    latent_scale: float = 0.18215
    """Multiplier applied to sampled latents (SD-VAE, ALGORITHM §3.4)."""
    vae: str = "stabilityai/sd-vae-ft-mse"
    """VAE that encoded a latent dataset (hub name, local path or fsspec URI); decodes grids and FID samples."""
    random_flip: bool = True
    """Random horizontal flip in the input pipeline (pixels only; latents store a flipped copy)."""
    shuffle_buffer: int = 2048
    """Local shuffle buffer of iter_torch_batches, on top of the per-epoch file shuffle."""
    prefetch_batches: int = 2
    """Batches prefetched by each worker's iterator."""
    readahead_mb: int = 256
    """Per worker, a background thread reads up to this many MiB of decoded batches ahead, across epoch
    boundaries, so the next epoch's Ray Data start-up (seconds) overlaps training; 0 = off. On GPU the
    batches are already on the device, so this much device memory is used."""

    cache_mb: int = 1024
    """Per worker: when this rank's decoded rows fit in this many MiB, the first epoch read from Ray Data
    is kept in memory and every later epoch is a new permutation of it (with fresh random flips), so
    Ray Data runs once, not once per epoch (pixels and paired data; latents resample their posterior
    noise on every read, so they always stream). 0 = off. On GPU the rows are kept in device memory."""

    def __post_init__(self) -> None:
        check(self.source in ("digits", "parquet", "fashion_mnist"),
               f"data.source must be 'digits', 'parquet' or 'fashion_mnist', got {self.source!r}")
        check(self.source != "parquet" or bool(self.uri),
               "data.source='parquet' needs data.uri (a local path or gs://bucket/prefix of shards)")
        check(self.kind in ("pixels", "latents"), f"data.kind must be 'pixels' or 'latents', got {self.kind!r}")
        check(self.image_size >= 1 and self.channels >= 1 and self.num_classes >= 1,
               "data.image_size, data.channels and data.num_classes must be >= 1")
        check(self.readahead_mb >= 0, f"data.readahead_mb must be >= 0 (0 = off), got {self.readahead_mb}")
        check(self.cache_mb >= 0, f"data.cache_mb must be >= 0 (0 = off), got {self.cache_mb}")


@dataclass(frozen=True)
class TrainConfig:
    """Loop, cluster shape, storage and periodic actions (`*_every` <= 0 disables; all also run after
    the last step)."""

    global_batch: int = 64
    """Batch over all workers; split evenly. The bootstrap layout is built over it (pitfall 9)."""
    max_steps: int = 2000
    seed: int = 10
    num_workers: int = 1
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    """CPUs reserved per worker; leave spare CPUs for Ray Data tasks (RAY_NOTES §2)."""
    torch_threads: int = 0
    """torch intra-op threads per worker; 0 = Ray's default (OMP_NUM_THREADS = the reserved CPUs, at least
    1). A CPU run whose epochs come from memory (data.cache_mb) leaves Ray Data idle after the first
    epoch, so it may use more threads than it reserves (the digits preset: 1 CPU, 2 threads)."""
    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    compile: str = "auto"
    """torch.compile: 'auto' (on for CUDA, off on CPU), 'on' or 'off' (true/false accepted). Single
    process: the whole forward, one graph; FSDP2: each block plus embedding and head (distributed.py)."""
    activation_checkpointing: bool = False
    activation_checkpointing_policy: str = "full"
    """With activation_checkpointing: 'full' recomputes whole blocks; 'selective' keeps matmul and
    attention outputs and recomputes only elementwise ops and LayerNorms."""
    log_every: int = 50
    sample_every: int = 1000
    """Sample grids at N = 1, 2, 4, ..., M from fixed noise."""
    checkpoint_every: int = 1000
    eval_every: int = 0
    """FID during training (needs eval.fid_weights)."""
    storage_path: str = ""
    """Ray run storage (local dir or gs://bucket/prefix). Empty: ./runs under the working directory."""
    run_name: str = ""
    """Stable name of the run; relaunching with the same name resumes it. Empty: derived."""
    resume_from: str = ""
    """Checkpoint URI of an earlier run to warm-start from (weights, EMA, optimiser, step)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before giving up (-1: forever)."""
    num_to_keep: int = 3
    """Checkpoints kept by Ray (oldest deleted)."""
    progress_bars: bool = False
    """Ray Data's progress bars on the console (off: one shortcut-ray line per log interval with ETA)."""

    def __post_init__(self) -> None:
        check(self.global_batch >= 1, f"train.global_batch must be >= 1, got {self.global_batch}")
        check(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        check(self.num_workers >= 1, f"train.num_workers must be >= 1, got {self.num_workers}")
        # global_batch % num_workers is checked in Config, which can suggest a value every check accepts
        check(self.max_failures >= -1, f"train.max_failures must be >= 0, or -1 for unlimited restarts "
                                        f"(Ray's FailureConfig), got {self.max_failures}")
        check(not self.run_name or (_RUN_NAME.fullmatch(self.run_name) is not None and set(self.run_name) != {"."}),
               f"train.run_name {self.run_name!r} must be one folder name (letters, digits, '.', '_', '-', '='; "
               f"no '/' or '..'): it is a folder under train.storage_path")
        check(self.precision in ("auto", "bf16", "fp32"),
               f"train.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        compile_mode = {True: "on", False: "off", "true": "on", "false": "off"}.get(
            str(self.compile).lower() if isinstance(self.compile, str) else self.compile, self.compile)
        object.__setattr__(self, "compile", compile_mode)  # old configs and --set say true/false
        check(self.compile in ("auto", "on", "off"),
               f"train.compile must be 'auto', 'on' or 'off', got {self.compile!r}")
        check(self.activation_checkpointing_policy in ("full", "selective"),
               f"train.activation_checkpointing_policy must be 'full' or 'selective', "
               f"got {self.activation_checkpointing_policy!r}")
        check(self.cpus_per_worker > 0, f"train.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        check(self.torch_threads >= 0, f"train.torch_threads must be >= 0 (0 = Ray's default), got {self.torch_threads}")
        check(self.num_to_keep >= 1, f"train.num_to_keep must be >= 1, got {self.num_to_keep}")


@dataclass(frozen=True)
class EvalConfig:
    """Sampling grids and FID (ALGORITHM §4, §5)."""

    sample_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    """Step counts of the logged sample grids."""
    grid_size: int = 8
    """Grid is grid_size x grid_size samples from fixed noise (seed eval.seed)."""
    cfg_scale: float = 1.0
    """Inference guidance w: 1 = conditional only, 0 = unconditional."""
    fid_steps: tuple[int, ...] = (1, 4, 128)
    fid_samples: int = 2048
    """Samples per N for FID during training (the paper uses 4096; 50k in jobs.evaluate)."""
    fid_weights: str = ""
    """FID InceptionV3 weights (TorchScript or pytorch-fid state dict; path or fsspec URI)."""
    fid_ref_stats: str = ""
    """Reference statistics (.npz with mu, sigma); empty: computed from the training data and cached."""
    seed: int = 42
    diagnostics: bool = True
    """At eval time (and at the end of a run) log the loss heat-map over (k, t) and one-step
    reconstructions (ALGORITHM §5) as images."""
    diagnostic_t_bins: int = 32
    """Columns of the loss heat-map: t in {0, 1/T, ..., (T-1)/T} (ALGORITHM §5: 32)."""
    diagnostic_rows: int = 16
    """Rows per worker for each heat-map cell and reconstruction (real images of the last batch)."""

    def __post_init__(self) -> None:
        check(len(self.sample_steps) >= 1 and len(self.fid_steps) >= 1,
               "eval.sample_steps and eval.fid_steps must not be empty")
        for n in (*self.sample_steps, *self.fid_steps):
            check(isinstance(n, int) and 1 <= n, f"eval step counts must be positive integers, got {n}")
        check(self.grid_size >= 1, f"eval.grid_size must be >= 1, got {self.grid_size}")
        check(self.diagnostic_t_bins >= 1 and self.diagnostic_rows >= 1,
               "eval.diagnostic_t_bins and eval.diagnostic_rows must be >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking from rank 0."""

    tracking_uri: str = ""
    """MLflow URI; empty: $MLFLOW_TRACKING_URI, else a local sqlite store in the working directory."""
    experiment: str = "shortcut-ray"
    run_name: str = ""
    """MLflow run name; empty: '<preset>-<train_type>-<timestamp>'."""
    enabled: bool = True
    parent_run_id: str = ""
    """Nest the run under this MLflow run (Tune sweeps: one parent run per sweep)."""
    tags: str = ""
    """Extra run tags as 'k1=v1,k2=v2'."""
    system_metrics: str = "auto"
    """MLflow system metrics (CPU, memory, disk, network; GPU when present) sampled on rank 0's node:
    'auto' (on for GPU runs), 'on' or 'off'."""
    log_model: bool = True
    """At the end of a run log the generator as an MLflow pyfunc model (weights as safetensors)."""
    register_model: str = "auto"
    """Model Registry name of the logged generator; 'auto': 'shortcut-ray-<preset>'; empty: do not register."""

    def __post_init__(self) -> None:
        check(self.system_metrics in ("auto", "on", "off"),
               f"tracking.system_metrics must be 'auto', 'on' or 'off', got {self.system_metrics!r}")


@dataclass(frozen=True)
class Config:
    """A whole run. `preset` records the preset it was derived from."""

    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check(self.data.image_size % self.model.patch_size == 0,
               f"data.image_size ({self.data.image_size}) must be divisible by model.patch_size "
               f"({self.model.patch_size})")
        m = self.objective.denoise_timesteps
        for n in self.eval.sample_steps + self.eval.fid_steps:
            check(n <= m, f"eval step count {n} exceeds objective.denoise_timesteps ({m}); "
                           f"the model was never trained on steps smaller than 1/{m}")
        gb, nw = self.train.global_batch, self.train.num_workers
        check(gb % nw == 0, f"train.global_batch ({gb}) must be divisible by train.num_workers ({nw}); e.g. set "
                             f"train.global_batch={suggest_global_batch(self.objective, gb, nw)}")
        if self.objective.train_type == "shortcut":
            check(self.objective.bootstrap_every >= 2,
                   "objective.bootstrap_every=1 makes every row a self-consistency row: no row gets the flow-matching "
                   "loss, the loss is exactly 0 and nothing is learned; use >= 2 (official: 8)")
            validate_bootstrap_layout(self.objective, gb, nw)
        elif self.objective.train_type == "live_reflow":
            validate_reflow_layout(self.objective, gb, nw)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return from_dict(cls, d)

    def flat(self) -> dict[str, object]:
        """Dotted keys -> values, for MLflow params."""
        out: dict[str, object] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for k, v in values.items():
                    out[f"{section}.{k}"] = v
            else:
                out[section] = values
        return out
