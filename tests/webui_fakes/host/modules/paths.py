import tempfile

models_path = tempfile.gettempdir() + "/erasure-fake-models"  # tests set their own
script_path = "."
data_path = "."
