# What the latent toy's teacher (configs/teachers/edm2_latent_toy.py) and its distillation
# (projects/cosim/latent_toy.py) share: the tiny EDM2 network on 4x4x4 latents of the 8x8 digits,
# the files tools/latent_toy.py writes, and the whitening of the toy VAE's latents (EDM2's
# raw_mean/raw_std; tools/latent_toy.py passes the values it measures on the encoded digits).
toy_dir = 'work_dirs/latent_toy'
toy_latent_data = toy_dir + '/digits-latents.zip'
toy_vae = toy_dir + '/vae'
toy_raw_mean = [0.0, 0.0, 0.0, 0.0]
toy_raw_std = [1.0, 1.0, 1.0, 1.0]
# the decoder un-whitens with the same constants the data was whitened with
toy_decoder = dict(type='StabilityVAE', path=toy_vae, raw_mean=toy_raw_mean, raw_std=toy_raw_std)
toy_network = dict(type='EDM2Precond', img_resolution=4, img_channels=4, label_dim=10, use_fp16=False,
                   model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
