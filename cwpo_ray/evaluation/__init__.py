"""`cwpo evaluate`'s components: pair accuracy and GRA (``scoring``) and where the figures go
(``reporting``). The recipe, ``cwpo_ray.recipes.evaluate``, generates and ties them together."""
