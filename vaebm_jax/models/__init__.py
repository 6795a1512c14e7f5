"""Networks of VAEBM: the NVAE (stage 1) and, later, the energy networks (stage 2)."""
