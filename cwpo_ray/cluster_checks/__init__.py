"""`cwpo preflight`'s components: what a config asks of the cluster (``plan``) and the checks run
on each node (``node``). The recipe, ``cwpo_ray.recipes.preflight``, runs them and prints the table."""
