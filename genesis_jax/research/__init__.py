"""The research state beside the weights: the curriculum, loss analytics, and what a run carries across resumes."""
