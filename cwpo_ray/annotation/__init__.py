"""`cwpo annotate`'s components: input rows (``rows``), work units and resume (``units``), one
unit inside an actor (``labeling``), statistics and the report (``stats``), the output files
(``outputs``). The recipe, ``cwpo_ray.recipes.annotate``, ties them together."""
