"""lineinspect line service. Never imports torch: the network is reached through engines.runtime."""
