from . import images, inference, model_folders, preprocess, training

model_folders.register()

NODE_CLASS_MAPPINGS = {**inference.NODE_CLASS_MAPPINGS, **training.NODE_CLASS_MAPPINGS, **images.NODE_CLASS_MAPPINGS,
                       **preprocess.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**inference.NODE_DISPLAY_NAME_MAPPINGS, **training.NODE_DISPLAY_NAME_MAPPINGS,
                              **images.NODE_DISPLAY_NAME_MAPPINGS, **preprocess.NODE_DISPLAY_NAME_MAPPINGS}
