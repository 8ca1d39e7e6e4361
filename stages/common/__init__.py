"""Support code shared by the stage scripts: params schema, data and model loading,
atomic output writing, MLflow tracking. Stages import this package, never each other."""
