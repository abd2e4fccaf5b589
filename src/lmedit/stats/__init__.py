"""Key statistics: corpora, the sample of them C averages over, the streaming second moment C = E[k kᵀ], its cache."""
