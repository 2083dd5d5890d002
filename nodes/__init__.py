from . import inference, model_folders

model_folders.register()

NODE_CLASS_MAPPINGS = {**inference.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**inference.NODE_DISPLAY_NAME_MAPPINGS}
