"""train-annotator's components: the data plan and k-fold rounds (``rounds``) and the Ray Train
worker's loop (``worker``). The recipe, ``cwpo_ray.recipes.train_annotator``, ties them together."""
