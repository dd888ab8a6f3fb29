"""Tools that hand the model to other formats and folders; run them from the repository root as modules
(``python -m scripts.convert_to_glm ...``), so that they import generate.py and each other as modules."""
