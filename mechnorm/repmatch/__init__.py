"""RepMatch: how similar two sets of training data are, judged by what a model learns from each.

Modarres, Abbasi & Pilehvar, "RepMatch: Quantifying Cross-Instance Similarities in
Representation Space" (2024). A LoRA adapter (peft) is fine-tuned on the attention query
and value projections of a frozen model, one adapter per data subset; two subsets are as
similar as the subspaces their updates ``ΔW = B·A`` write into (Grassmann similarity φ,
per layer and matrix, averaged). An instance is scored against a dataset by the update one
AdamW step on it alone makes from a fixed seeded initial adapter — here for a whole batch at
once with ``torch.func`` per-instance gradients and the first AdamW step in closed form.

Works on plain ``transformers`` models (peft adapts those): the zoo BERT classifier, the zoo
causal LMs, SmolLM2-135M or any HF causal-LM folder.

Example:
    >>> from mechnorm import repmatch, tasks                                    # doctest: +SKIP
    >>> agreement = tasks.get_task("agreement").train(512)                      # doctest: +SKIP
    >>> a = repmatch.train_adapter("zoo:gpt2-agree-recall", agreement[:256], steps=60)   # doctest: +SKIP
    >>> b = repmatch.train_adapter("zoo:gpt2-agree-recall", agreement[256:], steps=60)   # doctest: +SKIP
    >>> repmatch.subspace_similarity(a, b).mean                                 # doctest: +SKIP
"""

from .adapters import Adapter, initial_adapter, merged, train_adapter
from .instances import InstanceScores, first_adamw_step, instance_similarity, instance_similarity_loop
from .models import Base, ZooClassifier, accuracy, load_base
from .plots import instance_scores_plot, similarity_matrix_heatmap
from .subspace import (
    SimilarityMatrix,
    SubspaceSimilarity,
    grassmann,
    left_singular_vectors,
    similarity_matrix,
    subspace_similarity,
)

__all__ = [
    "Adapter", "Base", "InstanceScores", "SimilarityMatrix", "SubspaceSimilarity", "ZooClassifier", "accuracy",
    "first_adamw_step", "grassmann", "initial_adapter", "instance_scores_plot", "instance_similarity",
    "instance_similarity_loop", "left_singular_vectors", "load_base", "merged", "similarity_matrix",
    "similarity_matrix_heatmap", "subspace_similarity", "train_adapter",
]
