"""Display names of the training methods and merge methods: one source for every table and
figure the experiments write (the demo, Table 1, Fig. 5/6, Tables 3/4)."""

METHOD_LABELS = {"base": "Base (no training)", "sparse": "Element-Sparse", "block": "Block-Sparse", "lora": "LoRA",
                 "full": "Full-Finetune", "sparse_ld": "Element-Sparse + layer drop"}
MERGE_LABELS = {"overlap_average": "Averaging (Eq. 4)", "average": "Averaging", "task_arithmetic": "Task-Arithmetic",
                "ties": "Ties", "dare_linear": "DARE", "dare_ties": "DARE-Ties", "breadcrumbs": "Breadcrumbs",
                "magnitude_prune": "Magnitude-prune"}
