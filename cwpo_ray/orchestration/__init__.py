"""The pipeline's components: resumable stage markers (``markers``), each stage as a call of its
recipe (``stages``), the arms' extra tables (``arm_tables``), the MLflow run layout (``runs``).
The recipe, ``cwpo_ray.recipes.pipeline``, runs them in order."""
