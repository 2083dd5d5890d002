class CtrLoRAError(ValueError):
    """Bad input the user can fix: a wrong file, a mismatched model, an unusable image or dataset.

    The message always names the file or input and says what is wrong.
    """
