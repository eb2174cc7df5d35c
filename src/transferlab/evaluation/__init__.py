"""Evaluation: numbers about fitted methods. `metrics` (the seed's per-class table, bootstrap intervals, McNemar),
`selection` (choosing among methods on validation or CV scores only, data efficiency), `analysis` (a study's
selection then its test statistics), `leakage` (duplicates across splits). Rendering them is `report`'s job.
"""
