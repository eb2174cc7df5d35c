"""Fine-tuning end to end: `module` is the Lightning side (stages, augmentation, schedule, `FineTuneModule`);
`tuner` is `FineTuner`, a scikit-learn estimator over image paths, and its glue to the study (`fit_method`,
`cross_val_predict`). Imported only when a study fine-tunes (Lightning is slow to import).
"""
