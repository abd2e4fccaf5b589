"""Key statistics: corpora, the streaming second moment C = E[k kᵀ], and its cache."""
