"""The notebooks' experiment code, one module per notebook (only that notebook and its tests import it):
mini_backbone (00), attention_correspondence (01), latent_frequency (02), vae_crop_vs_full (03). The
library below it (methods, recipes, entry points) never imports from here."""
