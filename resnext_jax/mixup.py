"""Mixup and CutMix with mixed (optionally smoothed) targets, in pure JAX for the jitted step.

Semantics are those of timm's `timm.data.mixup.Mixup` in its default 'batch' mode, with
`correct_lam=True` and no `cutmix_minmax`:

* one draw per batch: with probability 1 − `prob` the batch is left as it is (λ = 1);
  otherwise, with both alphas > 0, CutMix is chosen with probability `switch_prob` (Mixup
  else); with one alpha > 0, that method; λ ~ Beta(α, α) of the chosen method;
* the partner of image i is image B − 1 − i of the global batch (timm's `x.flip(0)`);
* Mixup: x ← λ·x + (1 − λ)·x_partner;
* CutMix (timm's `rand_bbox`): cut = ⌊H·√(1 − λ)⌋ rows and ⌊W·√(1 − λ)⌋ columns, centre
  (cy, cx) uniform over the integer pixel positions, box rows [cy − ⌊cut_h/2⌋, cy + ⌊cut_h/2⌋)
  and likewise columns, clipped at the borders; the box's pixels come from the partner, the
  same box for every image; λ is then corrected to 1 − box area / (H·W);
* targets (timm's `mixup_target`): off = smoothing / K, on = 1 − smoothing + off,
  t = λ·onehot(y) + (1 − λ)·onehot(y_partner).

Randomness comes only from `rng`: all draws are scalars, so the result is the same however a
jitted caller shards the batch (the flip is over the global batch axis; XLA moves the data).

Differences from timm, none intended to change the distribution:

* the draws are independent `jax.random` streams (apply / switch / Beta / centre), not numpy's
  sequential global state, so the numbers for a given seed differ; timm draws nothing more
  once the batch is left alone, here everything is drawn and then selected;
* λ and the box size are computed in float32 (timm: float64), so ⌊H·√(1 − λ)⌋ can differ by
  one pixel for λ within float32 rounding of a boundary;
* inherited from timm on purpose: the unclipped box is 2·⌊cut/2⌋ pixels a side (an odd cut
  loses a row/column), so before clipping its area is at most (1 − λ)·H·W; the targets use the
  corrected λ, i.e. the true pixel fractions;
* timm asserts an even batch; here an odd batch is allowed (the middle image is its own
  partner, so it is unchanged and keeps its own label);
* Mixup is computed in at least float32 and cast back, so the images keep their dtype (timm
  mixes in the tensor's dtype in place); CutMix pixels are copied exactly;
* torchvision's RandomMixup/RandomCutmix (references/classification/transforms.py) pair with
  `roll(1, 0)` rather than a flip and use half-sizes ⌊½·√(1 − λ)·W⌋; this module follows timm.

`num_classes` and the alphas must be Python numbers (they choose the code); `prob`,
`switch_prob` and `label_smoothing` may also be traced scalars.
"""
import jax
import jax.numpy as jnp


def enabled(config):
    """Whether the config asks for Mixup or CutMix at all."""
    return config.get('mixup_alpha', 0.0) > 0 or config.get('cutmix_alpha', 0.0) > 0


def smoothed_one_hot(labels, num_classes, label_smoothing=0.0):
    """(B,) int → (B, K) float32: `1 − s + s/K` at the label, `s/K` elsewhere (timm)."""
    off = jnp.asarray(label_smoothing, jnp.float32) / num_classes
    on = 1.0 - jnp.asarray(label_smoothing, jnp.float32) + off
    hot = labels.astype(jnp.int32)[:, None] == jnp.arange(num_classes, dtype=jnp.int32)[None, :]
    return jnp.where(hot, on, off)


def mix(rng, images, labels, num_classes, *, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0,
        switch_prob=0.5, label_smoothing=0.0):
    """Mixup or CutMix of a batch, timm 'batch' mode (see the module docstring).

    Args:
      rng: a `jax.random` key; the only source of randomness.
      images: (B, H, W, C) floating point, NHWC.
      labels: (B,) integer class ids.
      num_classes: K, a Python int.
      mixup_alpha, cutmix_alpha: Beta(α, α) parameters, Python numbers; ≤ 0 turns that off.
      prob: probability that the batch is mixed at all.
      switch_prob: with both alphas > 0, the probability of CutMix rather than Mixup.
      label_smoothing: timm's smoothing of the one-hot targets.

    Returns:
      (mixed images, same shape and dtype; soft targets (B, K) float32, rows summing to 1).
    """
    if images.ndim != 4:
        raise ValueError(f'images must be NHWC, got shape {images.shape}')
    if labels.shape != images.shape[:1]:
        raise ValueError(f'labels must be ({images.shape[0]},), got {labels.shape}')
    targets = smoothed_one_hot(labels, num_classes, label_smoothing)
    use_mixup, use_cutmix_on = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix_on):
        return images, targets

    _, height, width, _ = images.shape
    k_apply, k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(rng, 6)
    apply = jax.random.uniform(k_apply) < prob
    if use_mixup and use_cutmix_on:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(use_cutmix_on)
    lam_mix = (jax.random.beta(k_mix, mixup_alpha, mixup_alpha, dtype=jnp.float32)
               if use_mixup else jnp.float32(1.0))
    lam_cut = (jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha, dtype=jnp.float32)
               if use_cutmix_on else jnp.float32(1.0))
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), jnp.float32(1.0))

    # CutMix box (empty unless CutMix is applied: λ = 1 gives a zero cut).
    cut_lam = jnp.where(use_cutmix, lam, jnp.float32(1.0))
    ratio = jnp.sqrt(jnp.maximum(1.0 - cut_lam, 0.0))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_cy, (), 0, height)
    cx = jax.random.randint(k_cx, (), 0, width)
    y_lo = jnp.clip(cy - cut_h // 2, 0, height)
    y_hi = jnp.clip(cy + cut_h // 2, 0, height)
    x_lo = jnp.clip(cx - cut_w // 2, 0, width)
    x_hi = jnp.clip(cx + cut_w // 2, 0, width)
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    in_box = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)
    box_area = (y_hi - y_lo) * (x_hi - x_lo)
    lam = jnp.where(use_cutmix, 1.0 - box_area.astype(jnp.float32) / (height * width), lam)

    partner = images[::-1]
    compute = jnp.promote_types(images.dtype, jnp.float32)
    blend_lam = jnp.where(use_cutmix, jnp.float32(1.0), lam).astype(compute)
    blended = (images.astype(compute) * blend_lam
               + partner.astype(compute) * (1 - blend_lam)).astype(images.dtype)
    # Exact copies where nothing is blended (λ = 1: the batch left alone, or outside the box).
    mixed = jnp.where(blend_lam == 1, images, blended)
    mixed = jnp.where(in_box[None, :, :, None], partner, mixed)

    targets = lam * targets + (1.0 - lam) * targets[::-1]
    return mixed, targets
