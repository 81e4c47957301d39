"""Experiments: end-to-end studies built from the library (training, evaluation, plots, reports).

    birdie      the Birdie comparison at CPU scale: objective mixtures (ntp, ul2, fixed, birdie, birdie-causal) and a
                Transformer, pretrained on one text with one token budget, then phone-book, infilling and
                perplexity evaluations (``ssmkit birdie``)
    retrieval   phone-book fine-tuning and digit accuracy, infilling accuracy
"""
