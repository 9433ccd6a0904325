"""The options of a training run (``clipcli train``'s, by their library names), and which of
them a resumed run keeps as the run's own."""

from __future__ import annotations

from dataclasses import dataclass, field

# What a resumed run may not take from its command line: it is the run's own.
RUN_FIELDS = ("arch", "init", "image_encoder", "text_encoder", "overrides", "image_tower", "image_pretrained",
              "text_init", "seed", "freeze", "lock_image_unlocked_groups", "decay_embeddings")
# What an epoch's data depends on: a checkpoint part-way through an epoch resumes only with the same.
DATA_FIELDS = ("train_data", "batch_size", "accum_freq", "drop_last", "train_num_samples", "dataset_resampled",
               "aug_cfg", "img_key", "caption_key")


@dataclass
class TrainConfig:
    train_data: str
    out: str
    val_data: str | None = None
    zeroshot_dir: str | None = None
    zeroshot_templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    img_key: str = "filepath"
    caption_key: str = "title"
    train_num_samples: int | None = None  # samples per epoch of WebDataset shards (None: their sizes, else counted)
    dataset_resampled: bool = False  # shards drawn with replacement (open_clip's --dataset-resampled)
    aug_cfg: dict | None = field(default_factory=dict)  # open_clip's aug_cfg; {}: its defaults; None: no augmentation
    drop_last: bool = True
    arch: str | None = "tiny"
    init: str | None = None
    image_encoder: str | None = None  # vit | resnet | mixer; None: what the arch or checkpoint has
    text_encoder: str | None = None  # transformer | mixer
    overrides: dict = field(default_factory=dict)  # CLIPConfig fields replacing the preset's
    image_tower: str | None = None  # torchvision:NAME: a torchvision backbone as the image tower
    image_pretrained: str | None = None  # its weights: "imagenet" (torchvision's) or a state-dict file
    text_init: str | None = None  # the text tower (and tokenizer) of this CLIP, for an image_tower model
    lock_image_unlocked_groups: int = 0  # with freeze "image" and an image_tower: its last N stages still train
    loss: str | None = None  # contrastive | sigmoid; None: the model's own (sigmoid when it has a logit bias)
    freeze: str | None = None  # image | text | both (both: an image_tower model, whose projections still train)
    epochs: int = 10
    batch_size: int = 64  # the global batch of one forward pass, over all processes
    accum_freq: int = 1  # global batches per optimizer step
    grad_checkpointing: bool = False
    local_loss: bool = False
    lr: float = 5e-4
    wd: float = 0.2
    decay_embeddings: bool = True
    beta1: float | None = None  # Adam's; None: by architecture (clipcli.train.optim)
    beta2: float | None = None
    eps: float | None = None
    warmup: int | None = None  # None: DEFAULT_WARMUP, shortened (and said) for a shorter run
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "cpu"
    workers: int = 2
    seed: int = 0
    log_every: int = 10
    val_frequency: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    save_every_n_steps: int = 0  # 0: a checkpoint after each epoch only
    keep: int = 0  # checkpoints kept (0: all)
    report_to: list[str] = field(default_factory=list)  # "tensorboard"
    resume: bool = False
    resume_from: str | None = None  # a step_N checkpoint of the run; None: its last
    overwrite: bool = False
