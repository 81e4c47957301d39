"""Time series: forecasting and classification with SSMs against standard baselines, on offline data.

- :mod:`.datasets`: the forecasting suite (pmdarima, statsmodels) and the UCR/UEA classification suite (sktime);
- :mod:`.csv_series`: user CSVs in the ETT layout, with one-line errors;
- :mod:`.companion`: SpaceTime's companion-matrix SSM (convolution, recurrence, closed loop);
- :mod:`.models`: SpaceTime, S-Mamba, Mamba/S4D forecasters, DLinear; :mod:`.intervals`: their Gaussian
  prediction intervals; :mod:`.classify`: the bidirectional SSM classifier, validation choice, seed ensembles;
  :mod:`.ssm_features`: random S4D features with a ridge classifier (ROCKET's recipe with SSM kernels);
- :mod:`.baselines`: seasonal naive, ETS, ARIMA (statsmodels), MiniRocket and 1-NN DTW (sktime);
- :mod:`.protocol`: rolling-origin evaluation; :mod:`.metrics`: MASE, sMAPE, MSE, MAE, ranks;
- :mod:`.suite`: one data set of either suite at a time, and its markdown; run by ``ssmkit reproduce
  ts-forecast`` and ``ts-classify`` (docs/reproductions/ts-*.md).
"""
