"""nn.Modules of the method: transformation models, similarity metrics, q_v, q_f and the energy."""
