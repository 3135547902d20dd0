"""train-policy's components: the training table and step plan (``train_table``), the reference
log-probs and their cache (``reference``), and the Ray Train worker's loop (``worker``). The
recipe, ``cwpo_ray.recipes.train_policy``, ties them together."""
