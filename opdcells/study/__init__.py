"""Study code used only by the notebooks (``Final_Project.ipynb``, ``OPD_Model_and_DinoV2.ipynb``).

``experiments``: the model comparison of the first notebook (train every model on every task, tables and
figures); ``transfer``: the second notebook's frozen probes, label-efficiency curves, real-cell checks
(``load_real_cells`` and its real-data file names) and attention figures. It builds on the package's
public API (train, evaluate, models, explain, plots) and nothing in the package imports it.
"""
