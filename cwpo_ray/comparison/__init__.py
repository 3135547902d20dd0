"""`cwpo compare`'s parts: reading a pipeline's arm runs from MLflow (collect), aggregating them over seeds
(aggregate), and rendering the result as Markdown tables (markdown) and charts (charts)."""
