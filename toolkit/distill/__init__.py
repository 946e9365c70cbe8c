"""Progressive distillation with the Balanced SNR-Aware loss weight (seed 003), CFG folded in.

A student initialised from the teacher learns to take in one DDIM step what the teacher takes in
two (seed 003 Algorithm 1, Salimans & Ho 2022 adapted to v-prediction); it then becomes the next
teacher and the number of sampling steps halves, round after round. With ``fold`` the teacher's
classifier-free-guided prediction is the target, so the student makes one conditional call per
step where the teacher made two (Meng et al. 2023); without it the student learns the conditional
and the unconditional branch and keeps CFG at sampling time. Folding can also be its own stage
before the halvings (``fold_iterations``, Meng et al. 2023 stage one, "round 0"): the student keeps
the teacher's step count and regresses the guided x̂ from the conditional call alone; the rounds
then distil that folded model, one call per teacher step.

Time is continuous as in :mod:`toolkit.diffusion`: a student of N steps samples on t = i / N and is
trained at those times only; its teacher's two steps go t → t − 0.5/N → t − 1/N. The x-space MSE
is weighted by a function of SNR(t) = α² / σ² (seed 003 eqs. 7–10, :data:`WEIGHTINGS`).

Runs under ``torchrun`` unchanged: with WORLD_SIZE > 1 the process group is initialised from the
environment (gloo on CPU, NCCL on GPU), the student is wrapped in DistributedDataParallel, every
rank draws the same global batch from one seeded stream and keeps its own slice (so a run on R
ranks takes the same steps as a run on one), and only rank 0 writes.

The package holds one job per module: ``weights`` (SNR weights), ``args`` (the run's config),
``targets`` (teacher targets and the loss), ``latents`` (the encoded data cache), ``ddp``
(torchrun glue), ``loop`` (rounds, state, checkpoints) and ``cli`` (the verb).
"""

from toolkit.distill.args import LR_DECAYS, DistillArgs
from toolkit.distill.cli import add_distill_parser, main
from toolkit.distill.latents import LATENTS_FILE, cached_latents, encode_latent_pairs
from toolkit.distill.loop import GRAD_CLIP, STATE_FILE, distill
from toolkit.distill.targets import (
                                     distill_loss,
                                     grid_alpha_sigma,
                                     guided_target,
                                     teacher_target,
)
from toolkit.distill.weights import (
                                     BSA_GAMMA,
                                     WEIGHTINGS,
                                     bsa_weight,
                                     min_snr_weight,
                                     snr_plus_one_weight,
                                     truncated_snr_weight,
)

__all__ = ["BSA_GAMMA", "GRAD_CLIP", "LATENTS_FILE", "LR_DECAYS", "STATE_FILE", "WEIGHTINGS", "DistillArgs",
           "add_distill_parser", "bsa_weight", "cached_latents", "distill", "distill_loss", "encode_latent_pairs",
           "grid_alpha_sigma", "guided_target", "main", "min_snr_weight", "snr_plus_one_weight", "teacher_target",
           "truncated_snr_weight"]
