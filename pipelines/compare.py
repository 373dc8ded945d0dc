"""Compare runs side by side in the form of the paper's Table 6: top-1 under the 11 shifted target priors, then
under the 6 knock-outs (25 % / 50 % of the head, tail or random classes without a test image) and the mean over
all 17, plus uniform Many/Medium/Few and ECE. Each run gets one row per post-hoc rule that fits its loss: its own first
(softmax, focal: PC compensation; balanced_softmax, lade, logit_adjusted, ldam_drw, causal_norm: prior injection),
then ``raw``; a run whose logits take PC (softmax, focal) also gets an ``adjusted`` row, Menon et al.'s post-hoc logit
adjustment z - τ log p_s + log p_t, and, with a plain linear classifier, a ``tau_norm`` row, Decouple's
τ-normalized classifier evaluated from the stored logits and weights; both with τ chosen on the validation split.
Computed from each run's stored test logits. --estimate-prior em mapls: per method a row with p_t estimated from
each target's own unlabeled logits; --aggregate self-supervised: for each multi-expert run (sade, balpoe) a row of
SADE's test-time aggregation, its weights learned on each target's stored augmented views.

The command itself is lade_core.cli.compare (also installed as `lade compare`); this file stays so that
`ray job submit --working-dir . -- python pipelines/compare.py ...` runs it from a checkout.
"""
import sys

from lade_core.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
