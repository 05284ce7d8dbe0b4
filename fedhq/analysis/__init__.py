"""Client-side analyses that produce FedHQ's two significances (paper §3.1-3.2).

`fedhq.analysis.accuracy`: accuracy significance, Alg. 1 (fit the client's data to the
nine Table 1 families) and Eq. 3. Only the resulting numbers leave a client.
"""
