"""regsweep's sweep service: spec, data, training, Ray Tune adapter, MLflow lineage, analysis."""
